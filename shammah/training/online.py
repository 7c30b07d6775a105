"""What the online loop adds around a training run: anchors against leaks, and the gate.

- **Anchors**: a pool of general prompts answered by the *base* model (adapter disabled),
  replayed as SFT targets, so a handful of corrections cannot drag unrelated answers along
  (shared/MEASURED.md: without it, teaching one made-up fact broke "capital of France").
  Answers are cached per base-model fingerprint.
- **Gate**: before a swap, the candidate is compared with the current adapter (or the base)
  on control prompts with known answers and on held-out feedback; it passes only if it
  answers at least as many controls correctly and its held-out loss is not worse.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from shammah.engine.generate import generate_batch
from shammah.paths import atomic_write
from shammah.training import methods
from shammah.training.data import Example

ANCHOR_PROMPTS = (
    "What is the capital of Germany?",
    "What is the capital of Spain?",
    "What is the capital of Egypt?",
    "What is the capital of Australia?",
    "What is the capital of Brazil?",
    "What is the largest planet?",
    "What is the boiling point of water in Celsius?",
    "Who painted the Mona Lisa?",
    "What is 3 + 5?",
    "How many days are in a week?",
    "What gas do plants absorb?",
    "What is the chemical symbol for gold?",
    "Who wrote Pride and Prejudice?",
    "What is the tallest mountain on Earth?",
    "How many legs does a spider have?",
    "What is the freezing point of water in Fahrenheit?",
    "What language is spoken in Mexico?",
    "What is the largest ocean?",
    "Name a primary color.",
    "What do bees make?",
    "Give me a synonym for happy.",
    "What is the opposite of cold?",
    "How many continents are there?",
    "What is the square root of 81?",
)

# Control prompts whose answers must survive every swap: (prompt, accepted answers).
CONTROLS = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("What is 2+2?", ("4", "four")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
)


def base_answers(
    model, tok, prompts: list[str], max_new_tokens: int, cache_file: Path | None, fingerprint: str
) -> list[str]:
    """The base model's (adapter disabled) greedy answers, cached per base-weights fingerprint."""
    key = {"fingerprint": fingerprint, "prompts": prompts, "max_new_tokens": max_new_tokens}
    if cache_file is not None and cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return cached["answers"]
    was_training = model.training
    model.eval()
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx:
        answers = generate_batch(model, tok, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens)
    model.train(was_training)
    if cache_file is not None:
        atomic_write(cache_file, json.dumps({"key": key, "answers": answers}))
    return answers


def anchor_examples(model, tok, n: int, cache_dir: Path | None, fingerprint: str, weight: float = 1.0) -> list[Example]:
    prompts = list(ANCHOR_PROMPTS[:n])
    answers = base_answers(model, tok, prompts, 48, cache_dir / "anchors.json" if cache_dir else None, fingerprint)
    return [
        Example("sft", ({"role": "user", "content": p},), (a,), weight=weight, source="anchor")
        for p, a in zip(prompts, answers, strict=True)
        if a
    ]


def _controls_right(answers: list[str]) -> list[bool]:
    return [any(ok in a.lower() for ok in oks) for a, (_, oks) in zip(answers, CONTROLS, strict=True)]


def _holdout_loss(model, tok, holdout: list[Example]) -> float | None:
    exs = [e for e in holdout if e.kind == "sft"]
    if not exs:
        return None
    feats = [methods.tokenize_example(tok, e, 512) for e in exs]
    batch = methods.collate(feats, tok.pad_token_id)
    batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        logp, n = methods.token_logps(model, batch)
    return float(-logp.sum() / n.sum())


def _cached_current_answers(parent_path: Path | None, cache_dir: Path | None, fingerprint: str) -> list[str] | None:
    """The current model's control answers without generating them again: the parent adapter's
    own gate recorded them when it was the candidate; the base model's are cached."""
    if parent_path is not None:
        try:
            answers = json.loads((parent_path / "shammah.json").read_text())["gate"]["answers"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            return None
        return [answers.get(p) for p, _ in CONTROLS] if all(p in answers for p, _ in CONTROLS) else None
    if cache_dir is None:
        return None
    f = cache_dir / "controls.json"
    if f.is_file():
        cached = json.loads(f.read_text())
        if cached.get("key") == {
            "fingerprint": fingerprint,
            "prompts": [p for p, _ in CONTROLS],
            "max_new_tokens": GATE_TOKENS,
        }:
            return cached["answers"]
    return None


GATE_TOKENS = 24


def gate(
    model, tok, parent_path: Path | None, holdout: list[Example], cache_dir: Path | None = None, fingerprint: str = ""
) -> dict:
    """Compare the trained adapter ('default') with the current one (the parent, else the base)."""
    model.eval()
    prompts = [[{"role": "user", "content": p}] for p, _ in CONTROLS]
    cand_answers = generate_batch(model, tok, prompts, GATE_TOKENS)
    cand_loss = _holdout_loss(model, tok, holdout)
    cur_answers = _cached_current_answers(parent_path, cache_dir, fingerprint)
    cur_loss = None
    if cur_answers is None or holdout:
        if parent_path is not None:
            model.load_adapter(str(parent_path), adapter_name="current")
            model.set_adapter("current")
            ctx = contextlib.nullcontext()
        else:
            ctx = model.disable_adapter()
        with ctx:
            if cur_answers is None:
                cur_answers = generate_batch(model, tok, prompts, GATE_TOKENS)
                if parent_path is None and cache_dir is not None:
                    key = {
                        "fingerprint": fingerprint,
                        "prompts": [p for p, _ in CONTROLS],
                        "max_new_tokens": GATE_TOKENS,
                    }
                    atomic_write(cache_dir / "controls.json", json.dumps({"key": key, "answers": cur_answers}))
            cur_loss = _holdout_loss(model, tok, holdout)
        if parent_path is not None:
            model.set_adapter("default")
            model.delete_adapter("current")
    cand_ok, cur_ok = _controls_right(cand_answers), _controls_right(cur_answers)
    loss_ok = cand_loss is None or cur_loss is None or cand_loss <= cur_loss + 1e-6
    passed = sum(cand_ok) >= sum(cur_ok) and loss_ok
    lost = [CONTROLS[i][0] for i, (a, b) in enumerate(zip(cand_ok, cur_ok, strict=True)) if b and not a]
    return {
        "passed": passed,
        "controls": f"{sum(cand_ok)}/{len(CONTROLS)}",
        "controls_current": f"{sum(cur_ok)}/{len(CONTROLS)}",
        "controls_lost": lost,
        "holdout_loss": cand_loss,
        "holdout_loss_current": cur_loss,
        "holdout_examples": len(holdout),
        "answers": dict(zip([p for p, _ in CONTROLS], cand_answers, strict=True)),
    }
