"""Tokenisation and losses: SFT (response tokens only), DPO, KTO and a pairwise ranking loss.

Every example becomes one or more token sequences with labels that mask the
prompt; a batch is all of its examples' sequences padded together, so one
forward pass serves every kind. The losses are written here, not taken from
TRL's DPOTrainer/KTOTrainer, because those each own a data pipeline for one
kind: we mix SFT targets, preference pairs, labelled and ranked examples from
the same feedback in one run with per-example sampling weights. The maths is
short and tested against hand-computed values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shammah.training.args import TrainArgs
from shammah.training.data import Example

IGNORE = -100


def as_sft(examples: list[Example]) -> list[Example]:
    """method = sft: train every usable target by plain SFT; undesirable completions are dropped."""
    out = []
    for e in examples:
        if e.kind == "unpaired" and not e.label:
            continue  # never an SFT target
        out.append(Example("sft", e.prompt, e.responses[:1], True, e.weight, e.source))
    return out


def tokenize_example(tok, ex: Example, max_length: int) -> dict:
    """Token ids and labels for each response of ``ex``: prompt (masked) + response + EOS."""
    prompt_ids = list(
        tok.apply_chat_template(list(ex.prompt), add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    seqs = []
    eos = (
        [tok.eos_token_id] if ex.meta.get("eos", True) else []
    )  # no EOS: the target says how to start, not where to stop
    for text in ex.responses:
        resp = tok(text, add_special_tokens=False)["input_ids"] + eos
        resp = resp[: max_length - 1]
        p = prompt_ids[-(max_length - len(resp)) :] if len(prompt_ids) + len(resp) > max_length else prompt_ids
        free = min(int(ex.meta.get("free_prefix", 0)), len(resp))  # the opening tokens: no loss
        seqs.append((p + resp, [IGNORE] * (len(p) + free) + resp[free:]))
    return {"kind": ex.kind, "label": ex.label, "seqs": seqs}


def collate(features: list[dict], pad_id: int) -> dict:
    """Pad every sequence of every example into one batch; ``layout`` maps examples to rows."""
    rows, layout = [], []
    for f in features:
        start = len(rows)
        rows.extend(f["seqs"])
        layout.append((f["kind"], list(range(start, len(rows))), bool(f["label"])))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "layout": layout}
    if all("ref" in f for f in features if f["kind"] in ("pair", "unpaired")):
        batch["ref_logps"] = torch.tensor([r for f in features for r in f.get("ref", [0.0] * len(f["seqs"]))])
    return batch


def precompute_reference(model, features: list[dict], pad_id: int, batch_size: int) -> None:
    """Store the reference model's (adapter disabled) log-probs on every pair/unpaired feature,
    once, instead of a second forward pass at every step (the reference never changes)."""
    todo = [f for f in features if f["kind"] in ("pair", "unpaired")]
    was_training = model.training
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            b = collate([{k: v for k, v in f.items() if k != "ref"} for f in chunk], pad_id)
            b = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in b.items()}
            ref, _ = token_logps(model, b)
            for f, (_, rows, _) in zip(chunk, b["layout"], strict=True):
                f["ref"] = [float(ref[r]) for r in rows]
    model.train(was_training)


def token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token log-probs per row, number of target tokens per row)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits
    L = batch["input_ids"].shape[1]
    if logits.shape[1] > L:  # prompt tuning prepends virtual tokens
        logits = logits[:, -L:]
    # Shift the labels, not the logits: slicing [B, L, V] logits would copy them (~100 MB a batch here).
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    mask = labels != IGNORE
    return -(nll * mask).sum(-1), mask.sum(-1)


def dpo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023) on summed log-probs of chosen/rejected."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def kto_loss(p, r, desirable: torch.Tensor, beta: float, w_d: float, w_u: float) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024). The reference point z0 is the batch's mean policy/reference
    log-ratio, detached and clamped at 0 — a cheaper estimate than TRL's mismatched-pair KL."""
    ratio = p - r
    z0 = ratio.detach().mean().clamp(min=0)
    loss_d = w_d * (1 - torch.sigmoid(beta * (ratio - z0)))
    loss_u = w_u * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, loss_d, loss_u)


def ranking_loss(mean_logps: torch.Tensor, margin: float) -> torch.Tensor:
    """Pairwise hinge on length-normalised log-probs of responses ordered best first (RRHF-style)."""
    n = mean_logps.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return F.relu(margin - (mean_logps[i] - mean_logps[j])).mean()


@dataclass
class Objective:
    """The training loss for a mixed batch: each kind's loss, weighted by its share of the batch."""

    args: TrainArgs

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        layout = batch["layout"]
        logp, ntok = token_logps(model, batch)
        needs_ref = any(kind in ("pair", "unpaired") for kind, _, _ in layout)
        ref = batch.get("ref_logps")
        if needs_ref and ref is None:
            with torch.no_grad(), model.disable_adapter():
                ref, _ = token_logps(model, batch)
        parts: dict[str, tuple[torch.Tensor, int]] = {}
        a = self.args
        by_kind: dict[str, list] = {}
        for kind, rows, label in layout:
            by_kind.setdefault(kind, []).append((rows, label))
        if "sft" in by_kind:
            rows = [r[0] for r, _ in by_kind["sft"]]
            parts["sft"] = (-logp[rows].sum() / ntok[rows].sum().clamp(min=1), len(rows))
        if "pair" in by_kind:
            c = [r[0] for r, _ in by_kind["pair"]]
            j = [r[1] for r, _ in by_kind["pair"]]
            parts["dpo"] = (dpo_loss(logp[c], logp[j], ref[c], ref[j], a.beta).mean(), len(c))
        if "unpaired" in by_kind:
            rows = [r[0] for r, _ in by_kind["unpaired"]]
            desirable = torch.tensor([lab for _, lab in by_kind["unpaired"]], device=logp.device)
            loss = kto_loss(logp[rows], ref[rows], desirable, a.beta, a.kto_desirable_weight, a.kto_undesirable_weight)
            parts["kto"] = (loss.mean(), len(rows))
        if "ranked" in by_kind:
            losses = []
            for rows, _ in by_kind["ranked"]:
                mean = logp[rows] / ntok[rows].clamp(min=1)
                best_nll = -logp[rows[0]] / ntok[rows[0]].clamp(min=1)
                losses.append(ranking_loss(mean, a.ranking_margin) + best_nll)
            parts["ranking"] = (torch.stack(losses).mean(), len(losses))
        total_n = sum(n for _, n in parts.values())
        loss = sum(v * (n / total_n) for v, n in parts.values())
        return loss, {k: float(v.detach()) for k, (v, _) in parts.items()}
