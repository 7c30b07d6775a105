"""Tokenisation and losses: SFT (response tokens only), DPO, KTO, a pairwise ranking loss and
distillation (KL to a teacher's token distribution).

Every example becomes one or more token sequences with labels that mask the
prompt; a batch is all of its examples' sequences padded together, so one
forward pass serves every kind. The losses are written here, not taken from
TRL's DPOTrainer/KTOTrainer, because those each own a data pipeline for one
kind: we mix SFT targets, preference pairs, labelled and ranked examples from
the same feedback in one run with per-example sampling weights. The maths is
short and tested against hand-computed values.

**Distillation** (kind ``distill``): the student, given ``prompt``, is trained towards the
*teacher's* next-token distribution at every response token, where the teacher is the base model
(adapter disabled) or the current model, given ``meta["teacher_prompt"]`` (the same prompt, or the
prompt with the user's note in context: context distillation, Snell et al. 2022). The teacher's
top-``TOPK`` log-probs are computed once before training (like DPO's reference log-probs) and the
loss is the forward KL on that support plus the remaining mass as one bucket. Against leaks this
holds the whole distribution where SFT on the teacher's greedy text holds only its argmax.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shammah.training.args import TrainArgs
from shammah.training.data import Example

IGNORE = -100


TOPK = 32  # teacher log-probs kept per token: the rest of its mass is one bucket


def as_sft(examples: list[Example]) -> list[Example]:
    """method = sft: train every usable target by plain SFT; undesirable completions are dropped
    (distillation stays distillation: its target is a distribution, not a text)."""
    out = []
    for e in examples:
        if e.kind == "unpaired" and not e.label:
            continue  # never an SFT target
        if e.kind == "distill":
            out.append(e)
            continue
        out.append(Example("sft", e.prompt, e.responses[:1], True, e.weight, e.source))
    return out


def _prompt_ids(tok, messages) -> list[int]:
    return list(
        tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def tokenize_example(tok, ex: Example, max_length: int) -> dict:
    """Token ids and labels for each response of ``ex``: prompt (masked) + response + EOS.
    A distillation example also gets the teacher's sequence: its own prompt + the same response."""
    prompt_ids = _prompt_ids(tok, ex.prompt)
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
    feat = {"kind": ex.kind, "label": ex.label, "seqs": seqs}
    if ex.kind == "distill":
        (ids, labels), resp_len = seqs[0], len(seqs[0][0]) - len(p)
        t_prompt = _prompt_ids(tok, ex.meta.get("teacher_prompt") or ex.prompt)
        # The teacher scores the same response tokens after its own prompt; n = tokens with a loss.
        n = sum(lab != IGNORE for lab in labels)
        feat["teacher"] = {"ids": t_prompt + ids[len(ids) - resp_len :], "n": n, "who": ex.meta.get("teacher", "base")}
    return feat


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
    if any(f["kind"] == "distill" for f in features):
        # The teacher's top-k at each position whose *next* token has a loss (labels are shifted by one).
        k = next(f["topk"][0].shape[-1] for f in features if f["kind"] == "distill")
        idx = torch.zeros((len(rows), width, k), dtype=torch.long)
        logp = torch.zeros((len(rows), width, k))
        kl_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for f, (kind, r, _) in zip(features, layout, strict=True):
            if kind != "distill":
                continue
            pos = (labels[r[0], 1:] != IGNORE).nonzero().squeeze(-1)
            idx[r[0], pos], logp[r[0], pos] = f["topk"]
            kl_mask[r[0], pos] = True
        batch.update(kl_idx=idx, kl_logp=logp, kl_mask=kl_mask)
    return batch


def precompute_reference(model, features: list[dict], pad_id: int, batch_size: int) -> None:
    """Store the reference model's (adapter disabled) log-probs on every pair/unpaired feature,
    and the teacher's top-k log-probs on every distill feature, once, instead of a second forward
    pass at every step (neither changes during training)."""
    todo = [f for f in features if f["kind"] in ("pair", "unpaired")]
    was_training = model.training
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        for chunk in _by_tokens(todo, batch_size):
            b = collate([{k: v for k, v in f.items() if k != "ref"} for f in chunk], pad_id)
            b = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in b.items()}
            ref, _ = token_logps(model, b)
            for f, (_, rows, _) in zip(chunk, b["layout"], strict=True):
                f["ref"] = [float(ref[r]) for r in rows]
    for who in ("base", "current"):
        todo = [f for f in features if f["kind"] == "distill" and f["teacher"]["who"] == who]
        ctx = model.disable_adapter() if who == "base" else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            for chunk in _by_tokens(todo, batch_size, key=lambda f: len(f["teacher"]["ids"])):
                _teacher_topk(model, chunk, pad_id)
    model.train(was_training)


REFERENCE_TOKENS = 1024  # tokens per no-grad forward of the reference/teacher pass


def _by_tokens(features: list[dict], most: int, key=None):
    """Consecutive chunks of at most ``most`` features and (beyond the first) ``REFERENCE_TOKENS``
    tokens: short lessons go four at a time, long replies one at a time (a batch of long replies'
    full-vocabulary logits was gigabytes)."""
    key = key or (lambda f: sum(len(ids) for ids, _ in f["seqs"]))
    chunk: list[dict] = []
    for f in features:
        if chunk and (len(chunk) == most or (len(chunk) + 1) * max(map(key, [*chunk, f])) > REFERENCE_TOKENS):
            yield chunk
            chunk = []
        chunk.append(f)
    if chunk:
        yield chunk


def _teacher_topk(model, chunk: list[dict], pad_id: int) -> None:
    width = max(len(f["teacher"]["ids"]) for f in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, f in enumerate(chunk):
        t = f["teacher"]["ids"]
        ids[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), 1
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
    for i, f in enumerate(chunk):
        t, n = len(f["teacher"]["ids"]), f["teacher"]["n"]
        # Positions predicting the last n tokens (the response tokens that carry a loss).
        lp = torch.log_softmax(logits[i, t - 1 - n : t - 1].float(), dim=-1)
        top = lp.topk(min(TOPK, lp.shape[-1]), dim=-1)
        f["topk"] = (top.indices.cpu(), top.values.cpu())


def _kl_terms(logits: torch.Tensor, idx: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at each position, over the teacher's top-k plus a tail bucket:
    student ``logits`` [..., V], the teacher's top-k ids and log-probs [..., k]."""
    logq = logits.gather(-1, idx) - logits.logsumexp(-1, keepdim=True)
    p, q = logp.exp(), logq.exp()
    p_tail = (1 - p.sum(-1)).clamp(min=1e-8)
    q_tail = (1 - q.sum(-1)).clamp(min=1e-8)
    return (p * (logp - logq)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())


def distill_loss(logits: torch.Tensor, batch: dict, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row mean forward KL(teacher || student) over the teacher's top-k plus a tail bucket.
    ``keep``: the positions ``logits`` are for (None: all of them)."""
    m, idx, lp = batch["kl_mask"], batch["kl_idx"], batch["kl_logp"]
    if keep is not None:
        m, idx, lp = m[:, keep], idx[:, keep], lp[:, keep]
    elif logits.shape[1] > m.shape[1]:  # prompt tuning prepends virtual tokens
        logits = logits[:, -m.shape[1] :]
    kl = _kl_terms(logits[m].float(), idx[m], lp[m])  # only positions with a teacher
    per_row = torch.zeros(m.shape[0], device=kl.device).index_add(0, m.nonzero()[:, 0], kl)
    return per_row / m.sum(-1).clamp(min=1)


def token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token log-probs per row, number of target tokens per row)."""
    logp, n, _, _ = _forward(model, batch)
    return logp, n


# Logit values per slice of the output head. A batch of long replies' full-vocabulary logits (4 rows
# x 600 positions x 49k tokens in fp32, plus log-softmax and their gradients) was gigabytes of a
# training step. Beyond this many values (128 MB in fp32) the head runs slice by slice and is
# recomputed in the backward pass (torch.utils.checkpoint), so one slice's logits exist at a time;
# below it (short lessons: every chat job so far) it runs once, with no recomputation.
HEAD_BUDGET = 32 * 2**20
PLAIN_HEADS = {"llama", "qwen2", "qwen3", "mistral"}  # logits = lm_head(final hidden state), nothing more


def _head_slice(head, h, labels, idx=None, logp=None, mask=None):
    """Per-position NLL (and KL to the teacher where ``mask``) of one slice of positions."""
    logits = head(h).float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    if idx is None:
        return nll
    return nll, torch.where(mask, _kl_terms(logits, idx, logp), torch.zeros_like(nll))


def _sliced_head(lm, batch: dict, labels: torch.Tensor, keep: torch.Tensor):
    """(NLL [B, K], KL [B, K] or None) at positions ``keep``, the head run slice by slice."""
    from torch.utils.checkpoint import checkpoint

    out = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    h = out.last_hidden_state[:, keep]
    head = lm.get_output_embeddings()
    distill = "kl_mask" in batch
    if distill:
        m, idx, lp = batch["kl_mask"][:, keep], batch["kl_idx"][:, keep], batch["kl_logp"][:, keep]
    per_slice = max(1, HEAD_BUDGET // (h.shape[0] * head.weight.shape[0]))  # positions
    sliced = per_slice < h.shape[1] and torch.is_grad_enabled()
    nlls, kls = [], []
    for s in range(0, h.shape[1], per_slice):
        sl = slice(s, s + per_slice)
        args = (head, h[:, sl], labels[:, sl]) + ((idx[:, sl], lp[:, sl], m[:, sl]) if distill else ())
        res = checkpoint(_head_slice, *args, use_reentrant=False) if sliced else _head_slice(*args)
        if distill:
            nlls.append(res[0])
            kls.append(res[1])
        else:
            nlls.append(res)
    return torch.cat(nlls, 1), (torch.cat(kls, 1) if distill else None)


def _forward(
    model, batch: dict, all_positions: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(target log-prob sums, target counts, the distillation loss per row or None, the positions
    the head ran at).

    The output head runs only at positions where some row has a loss: a 49k-vocab head over every
    prompt token was most of a step's memory and a good part of its time, and those logits were
    thrown away. For plain heads it runs slice by slice (``HEAD_BUDGET``). Prompt tuning prepends
    virtual tokens: all positions there, through the model's own forward."""
    # Shift the labels, not the logits: slicing [B, L, V] logits would copy them.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    L = labels.shape[1]
    cfg = getattr(model, "active_peft_config", None)
    keep = None
    if not all_positions and not getattr(cfg, "is_prompt_learning", False):
        has = labels != IGNORE
        if "kl_mask" in batch:
            has = has | batch["kl_mask"]
        keep = has.any(0).nonzero().squeeze(-1)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    distill = None
    if keep is not None and getattr(lm.config, "model_type", None) in PLAIN_HEADS and hasattr(lm, "model"):
        labels = labels[:, keep]
        nll, kl = _sliced_head(lm, batch, labels, keep)
        if kl is not None:
            distill = kl.sum(-1) / batch["kl_mask"][:, keep].sum(-1).clamp(min=1)
    else:
        kw = {} if keep is None else {"logits_to_keep": keep}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
        if keep is not None:
            labels = labels[:, keep]
        elif logits.shape[1] > L:  # prompt tuning prepends virtual tokens
            logits = logits[:, -L:]
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(labels.shape)
        if "kl_mask" in batch:
            distill = distill_loss(logits, batch, keep)
    mask = labels != IGNORE
    return -(nll * mask).sum(-1), mask.sum(-1), distill, keep


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
        logp, ntok, distill, keep = _forward(model, batch)
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
        if "distill" in by_kind:
            rows = [r[0] for r, _ in by_kind["distill"]]
            parts["distill"] = (distill[rows].mean(), len(rows))
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
