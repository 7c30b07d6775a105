"""What the base model expects a reply to open with: the log-probability of each of a choice's
answers' first tokens right after the chat template's assistant turn begins (adapters/choice.py).

Asked of the question alone, as one user message, with any adapter disabled: the job that learns a
choice and the engine that answers by it see the same numbers, whatever the chat's history or the
adapter has learned since.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch


def first_tokens(tok, answers: Sequence[str]) -> list[int]:
    """The first token of each answer as the reply's opening (no leading space)."""
    return [(tok.encode(a, add_special_tokens=False) or [-1])[0] for a in answers]


def _prompt_ids(tok, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )


def first_token_logprobs(
    model, tok, questions: Sequence[str], answers: Sequence[str], batch: int = 16
) -> list[list[float]]:
    """Per question, the log-probability of each answer's first token opening the reply."""
    wanted = torch.tensor(first_tokens(tok, answers))
    fill = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
    seqs = [_prompt_ids(tok, q) for q in questions]
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    out: list[list[float]] = []
    with torch.no_grad(), off:
        for i in range(0, len(seqs), batch):
            chunk = seqs[i : i + batch]
            n = max(map(len, chunk))
            # right-padded: a causal model's real tokens never see the padding after them
            ids = torch.tensor([s + [fill] * (n - len(s)) for s in chunk], device=model.device)
            mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in chunk], device=model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            last = torch.tensor([len(s) - 1 for s in chunk], device=logits.device)
            lp = logits[torch.arange(len(chunk), device=logits.device), last].float().log_softmax(-1)
            out += lp[:, wanted.to(lp.device)].tolist()
    return out
