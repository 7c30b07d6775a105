"""What the base model expects a reply to open with: the log-probability of each of a choice's
answers' first tokens right after the chat template's assistant turn begins (adapters/choice.py).

Asked of the question alone, as one user message, with any adapter disabled: the job that learns a
choice and the engine that answers by it see the same numbers, whatever the chat's history or the
adapter has learned since.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shammah.engine.keys import base_batches


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
    out: list[list[float]] = []
    for ids, mask in base_batches(model, tok, [_prompt_ids(tok, q) for q in questions], batch):
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1  # each prompt's own last token
        lp = logits[torch.arange(len(ids), device=logits.device), last.to(logits.device)].float().log_softmax(-1)
        out += lp[:, wanted.to(lp.device)].tolist()
    return out
