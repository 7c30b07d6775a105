"""`shammah eval`: score the base model, an adapter, or two adapters composed, on a JSONL set of
prompts with reference answers (the training formats: prompt/completion, messages, or a pair's
chosen answer).

Metrics (``--metrics``; by default the ones that fit the references):

- ``exact``: the reply equals the reference (whitespace-trimmed);
- ``json``: share of replies that parse as JSON (default when every reference is JSON);
- ``fields``: per-field accuracy of JSON answers: of the fields in the reference or the reply
  (nested keys flattened: ``args.title``), the share with the same value in both, averaged over
  examples (default when every reference is a JSON object);
- ``accuracy`` and ``f1`` (macro): references as class labels, the reply's first line as the
  predicted label (default when the references are a few short labels);
- ``chrf``: corpus chrF (character 6-grams, β = 2, whitespace ignored), the free-text metric;
- ``loss`` and ``perplexity``: the reference's mean token loss given the prompt (teacher forced);
- ``latency``: mean seconds per reply (greedy, transformers' generate, this machine).

Generation is greedy, so a score is reproducible. Everything runs on transformers + PEFT, the
same model code the trainer uses (not the chat's fast decoder).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from shammah.errors import ShammahError

ALL_METRICS = ("exact", "json", "fields", "accuracy", "f1", "chrf", "loss", "perplexity", "latency")
HIGHER_IS_BETTER = {"exact", "json", "fields", "accuracy", "f1", "chrf"}


class EvalError(ShammahError):
    pass


@dataclass(frozen=True)
class Item:
    messages: tuple[dict, ...]
    reference: str
    source: str


def load_items(path: Path) -> list[Item]:
    from shammah.training.data import load_jsonl

    items = []
    for ex in load_jsonl(path):
        if ex.kind not in ("sft", "pair") or not ex.responses:
            raise EvalError(
                f"{ex.source}: a {ex.kind} example has no reference answer; eval reads prompt/completion, "
                "messages, or pairs (their chosen answer)"
            )
        items.append(Item(ex.prompt, ex.responses[0], ex.source))
    return items


# --- metrics ------------------------------------------------------------------------------------
def _label(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first.strip().strip(".!").strip().lower()


def default_metrics(refs: list[str]) -> tuple[str, ...]:
    out = ["exact"]
    if refs and all(_is_json(r) for r in refs):
        out.append("json")
        if all(isinstance(json.loads(r), dict) for r in refs):
            out.append("fields")
    labels = {_label(r) for r in refs}
    if len(refs) >= 4 and len(labels) <= max(2, len(refs) // 3) and all(len(r.split()) <= 3 for r in refs):
        out += ["accuracy", "f1"]
    return (*out, "chrf", "loss", "perplexity", "latency")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, TypeError):
        return False
    return True


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def field_accuracy(replies: list[str], refs: list[str]) -> float:
    """Mean over examples of: fields equal in reply and reference / fields in either."""
    total = 0.0
    for reply, ref in zip(replies, refs, strict=True):
        want = _flat(json.loads(ref)) if _is_json(ref) else {"": ref.strip()}  # a text answer: one field
        got = _flat(json.loads(reply)) if _is_json(reply) else {}
        keys = set(want) | set(got)
        total += sum(k in want and k in got and want[k] == got[k] for k in keys) / max(len(keys), 1)
    return total / max(len(refs), 1)


def macro_f1(preds: list[str], refs: list[str]) -> float:
    """Macro F1 over the reference labels (a predicted label outside them counts against recall)."""
    scores = []
    for label in sorted(set(refs)):
        tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
        fp = sum(p == label and r != label for p, r in zip(preds, refs, strict=True))
        fn = sum(p != label and r == label for p, r in zip(preds, refs, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def chrf(hyps: list[str], refs: list[str], order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popović 2015) with sacreBLEU's defaults: character n-grams 1..6 with
    whitespace removed, statistics summed over the corpus, precision and recall averaged over
    the orders, F-beta with beta 2, on a 0-100 scale. Written out (30 lines) rather than adding
    sacreBLEU and its dependencies for one metric; the tests check it against sacreBLEU."""
    stats = [[0, 0, 0] for _ in range(order)]  # per order: matches, hypothesis n-grams, reference n-grams
    for hyp, ref in zip(hyps, refs, strict=True):
        h, r = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, order + 1):
            hc = Counter(h[i : i + n] for i in range(len(h) - n + 1))
            rc = Counter(r[i : i + n] for i in range(len(r) - n + 1))
            s = stats[n - 1]
            s[0] += sum((hc & rc).values())
            s[1] += sum(hc.values()) if rc else 0  # an order the reference is too short for: no penalty
            s[2] += sum(rc.values())
    precs, recs = [], []
    for match, hyp_n, ref_n in stats:
        if hyp_n > 0 and ref_n > 0:
            precs.append(match / hyp_n)
            recs.append(match / ref_n)
    # sacreBLEU averages over the orders the sentences are long enough for
    if not precs:
        return 0.0
    p, r = sum(precs) / len(precs), sum(recs) / len(recs)
    if p + r == 0:
        return 0.0
    b2 = beta**2
    return 100 * (1 + b2) * p * r / (b2 * p + r)


def score(replies: list[str], refs: list[str], losses: list[tuple[float, int]], secs: list[float], metrics) -> dict:
    out: dict[str, float] = {}
    n = len(refs)
    for m in metrics:
        if m == "exact":
            out[m] = sum(a.strip() == b.strip() for a, b in zip(replies, refs, strict=True)) / n
        elif m == "json":
            out[m] = sum(_is_json(a) for a in replies) / n
        elif m == "fields":
            out[m] = field_accuracy(replies, refs)
        elif m == "accuracy":
            out[m] = sum(_label(a) == _label(b) for a, b in zip(replies, refs, strict=True)) / n
        elif m == "f1":
            out[m] = macro_f1([_label(a) for a in replies], [_label(b) for b in refs])
        elif m == "chrf":
            out[m] = chrf(replies, refs)
        elif m in ("loss", "perplexity"):
            total, count = sum(x for x, _ in losses), sum(c for _, c in losses)
            loss = total / max(count, 1)
            out[m] = loss if m == "loss" else math.exp(min(loss, 50))
        elif m == "latency":
            out[m] = sum(secs) / n
    return {k: round(v, 4) for k, v in out.items()}


# --- running a model ------------------------------------------------------------------------------
class Evaluator:
    """The base model loaded once; adapters attached by name, composed on request."""

    def __init__(self, base_dir: Path, registry, max_new_tokens: int = 128, threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.registry = registry
        self.tok = AutoTokenizer.from_pretrained(base_dir)
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.max_new_tokens = max_new_tokens
        self._peft = None
        self._target = "base"

    def use(self, target: str) -> None:
        """``base``, an adapter name, or ``a+b`` (both adapters, their deltas summed: PEFT's
        add_weighted_adapter with combination "cat", exact for LoRA)."""
        from peft import PeftModel

        names = [] if target == "base" else target.split("+")
        for name in names:
            info = self.registry.get(name)
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, str(info.path), adapter_name=name)
            elif name not in self._peft.peft_config:
                self._peft.load_adapter(str(info.path), adapter_name=name)
        if len(names) > 1 and target not in self._peft.peft_config:
            if not all(self._peft.peft_config[n].peft_type == "LORA" for n in names):
                raise EvalError(f"{target}: only LoRA adapters compose")
            self._peft.add_weighted_adapter(names, [1.0] * len(names), adapter_name=target, combination_type="cat")
        if names:
            self._peft.set_adapter(target)
        self._target = target

    def _model(self):
        import contextlib

        if self._peft is None:
            return self.model, contextlib.nullcontext()
        if self._target == "base":
            return self._peft, self._peft.disable_adapter()
        return self._peft, contextlib.nullcontext()

    def run(self, items: list[Item], metrics, progress=lambda done, total: None) -> tuple[dict, list[str]]:
        import torch

        from shammah.training.data import Example
        from shammah.training.methods import IGNORE, tokenize_example

        model, ctx = self._model()
        replies, secs, losses = [], [], []
        with ctx, torch.no_grad():
            for i, it in enumerate(items):
                ids = self.tok.apply_chat_template(
                    list(it.messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
                t0 = time.perf_counter()
                out = model.generate(
                    **ids,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id,
                )
                secs.append(time.perf_counter() - t0)
                new = out[0, ids["input_ids"].shape[1] :]
                if not torch.isfinite(model(out).logits).all():
                    raise EvalError(f"{self._target}: the model produced NaN/Inf on {it.source}")
                replies.append(self.tok.decode(new, skip_special_tokens=True).strip())
                if "loss" in metrics or "perplexity" in metrics:
                    feat = tokenize_example(self.tok, Example("sft", it.messages, (it.reference,)), 4096)
                    seq, labels = feat["seqs"][0]
                    logits = model(torch.tensor([seq])).logits[0, :-1]
                    target = torch.tensor(labels[1:])
                    keep = target != IGNORE
                    nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
                    losses.append((nll.item(), int(keep.sum())))
                progress(i + 1, len(items))
        return score(replies, [it.reference for it in items], losses, secs, metrics), replies


def parse_metrics(text: str | None, refs: list[str]) -> tuple[str, ...]:
    if not text:
        return default_metrics(refs)
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in ALL_METRICS]
    if bad:
        raise EvalError(f"--metrics: unknown {', '.join(bad)}; choose from {', '.join(ALL_METRICS)}")
    return names


def comparison_rows(a: str, sa: dict, b: str | None, sb: dict | None) -> tuple[tuple, list[tuple]]:
    if b is None or sb is None:
        return ("metric", a), [(k, f"{v:g}") for k, v in sa.items()]
    rows = []
    for k, v in sa.items():
        d = v - sb[k]
        better = (d > 0) == (k in HIGHER_IS_BETTER) if d else None
        mark = "" if better is None else (" ▲" if better else " ▼")
        rows.append((k, f"{v:g}", f"{sb[k]:g}", f"{d:+.4g}{mark}"))
    return ("metric", a, b, "delta"), rows
