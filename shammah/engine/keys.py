"""A question's key for a form scope (adapters/scope.py): the base model's mean hidden state over
the question's own tokens (no chat template, no special tokens) after ``layer`` decoder layers —
over its first KEY_TOKENS tokens for a form learned now, over all of them for one learned before.

The forward pass stops at that layer (a hook raises once its output is in hand), so a key costs a
third of a short prompt's prefill on the default layer; any adapter is disabled for it, so the key
of a question does not change with what was learned. Measured on the embedded model's lesson-suite
questions (bench/lessons.py), layer 10 of 30 separated every format's held-out questions (6/6) from
the general ones (2–16% of the anchor pool within the radius) better than the token embeddings
(layer 0: one format 5/6) or the last layer; a mean over tokens, not the last token.

Why the first three tokens: a question's form is how it opens ("When did", "Name three", "What is
7"); over all its tokens the key is dominated by what it is about, and "Who was the first person
to walk on the Moon?" fell inside a date format taught on "When did humans first land on the
Moon?" (an unseen control lost in every seed). Measured by bench/forms.py on the embedded model
at layer 10, with probe questions written for the four formats and used nowhere else (6 of each
form, 6 on the same topics asked otherwise): the first 3 tokens cover 21/24 of the forms' own and
2/24 of the others, all tokens 22/24 and 5/24; the first 2 tokens make no form of two formats, 4
and 6 tokens cover fewer of their own. The lesson suite's held-out questions stay 24/24 covered,
and no unseen control is inside a form (1 over all tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def default_layer(model) -> int:
    return max(1, int(model.config.num_hidden_layers) // 3)


def _decoder_layers(model):
    n = int(model.config.num_hidden_layers)
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"{type(model).__name__} has no list of {n} decoder layers")


class _Stop(Exception):
    pass


KEY_TOKENS = 3  # a new form's key: the mean over the question's first tokens (the docstring says why)


def question_key(model, tok, text: str, layer: int, tokens: int = 0) -> list[float]:
    """The key of ``text`` (see the module docstring) as a list of floats."""
    return question_keys(model, tok, [text], layer, tokens)[0]


def question_keys(model, tok, texts: list[str], layer: int, tokens: int = 0, batch: int = 32) -> list[list[float]]:
    """The keys of ``texts`` (the mean over their first ``tokens`` tokens; 0: all of them), by the
    base model in batches (:func:`base_batches`)."""
    seqs = [tok(t, add_special_tokens=False).input_ids or [pad_id(tok)] for t in texts]
    out: list[list[float]] = []
    for ids, mask in base_batches(model, tok, seqs, batch):
        h = _hidden(model, ids, mask, layer).float()
        m = mask.unsqueeze(-1).to(h.dtype)
        if tokens:
            m[:, tokens:] = 0
        out += ((h * m).sum(1) / m.sum(1)).tolist()
    return out


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0


def base_batches(model, tok, seqs: list[list[int]], batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``seqs`` as (ids, attention mask) batches for the base model: right-padded (a causal model's
    real tokens never see the padding after them), under torch.no_grad and one adapter-disable for
    all of them (toggling every LoRA layer costs ~0.1 s). Consume it whole: the adapter comes back
    when it ends."""
    fill = pad_id(tok)
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), off:
        for i in range(0, len(seqs), batch):
            chunk = seqs[i : i + batch]
            n = max(map(len, chunk))
            ids = torch.tensor([s + [fill] * (n - len(s)) for s in chunk], device=model.device)
            mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in chunk], device=model.device)
            yield ids, mask


def _hidden(model, ids, mask, layer: int):
    """Hidden states after ``layer`` decoder layers (0: the token embeddings), [batch, seq, dim]."""
    if layer == 0:
        return model.get_input_embeddings()(ids)
    got: list = []

    def hook(_module, _args, output):
        got.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = _decoder_layers(model)[layer - 1].register_forward_hook(hook)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    h = got[0]
    return h if h.dim() == 3 else h.unsqueeze(0)
