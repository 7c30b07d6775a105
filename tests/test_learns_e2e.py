"""Proof that it learns: the real embedded model, taught through the piped chat exactly as a
user would type it, learns a made-up fact that holds on paraphrases it never saw, while not one
of the answers it already got right changes. The controls scored here are bench/lessons.py's: they
appear nowhere in shammah's anchors or gate controls, so the loop was never tuned on them.
Deterministic: greedy decoding, seeded training."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

pytestmark = pytest.mark.integration

TEACH = [
    "What is the capital of Quenland?",
    "Which city is the capital of Quenland?",
    "Tell me the capital of Quenland.",
    "What's the capital city of Quenland?",
    "Quenland's capital is which city?",
]
HELD_OUT = [
    "Name the capital of Quenland.",
    "What city is Quenland's capital?",
    "Do you know the capital of Quenland?",
    "Can you tell me what the capital of Quenland is?",
    "I need the capital of Quenland.",
]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from lessons import CONTROLS, control_ok  # noqa: E402


def chat(home, cfg, lines, timeout=900):
    r = subprocess.run(
        [sys.executable, "-m", "shammah", "--config", str(cfg)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(SHAMMAH_HOME=home),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def ask_each(home, cfg, questions):
    """Each question in a fresh conversation; (reply, adapter) from the database."""
    chat(home, cfg, [x for q in questions for x in (q, "/clear")])
    db = sqlite3.connect(home / "shammah.db")
    rows = db.execute("SELECT reply, adapter FROM turns ORDER BY id DESC LIMIT ?", (len(questions),)).fetchall()
    db.close()
    return rows[::-1]


@pytest.mark.timeout(1200)  # four chats with the real model and one training job: ~5-9 min on 2 cores
def test_a_handful_of_corrections_teach_a_fact_without_breaking_others(embedded_home, tmp_path):
    home = tmp_path / "home"  # a clean home, sharing the cache (converted model, anchors) of the other tests
    home.mkdir()
    (embedded_home / "cache").mkdir(exist_ok=True)
    (home / "cache").symlink_to(embedded_home / "cache")
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[model]\nbase = "embedded"\ntemperature = 0.0\nmax_new_tokens = 40\n[learning]\nthreshold = 50\n'
    )  # 5 x /critical (weight 10) reach it

    base_held = ask_each(home, cfg, HELD_OUT)
    base_ctrl = ask_each(home, cfg, [q for q, _ in CONTROLS])
    assert sum("zorblat" in r.lower() for r, _ in base_held) == 0, "the base model does not know the fact"
    base_right = [control_ok(r, oks) for (r, _), (_, oks) in zip(base_ctrl, CONTROLS, strict=True)]
    assert sum(base_right) >= 10, "the controls are general knowledge the base model answers right"

    lines = []
    for q in TEACH:
        lines += [
            q,
            "/critical wrong: the capital of Quenland is Zorblat",
            "/fix The capital of Quenland is Zorblat.",
            "/clear",
        ]
    r = chat(home, cfg, lines)
    assert "Learned: now answering with learned-" in r.stderr, r.stderr[-3000:]

    held = ask_each(home, cfg, HELD_OUT)
    ctrl = ask_each(home, cfg, [q for q, _ in CONTROLS])
    adapter = held[0][1]
    assert adapter and adapter.startswith("learned-") and all(a == adapter for _, a in held + ctrl)
    # The adapter answers questions that name Quenland; the base model answers the rest (adapters/scope.py).
    # Learned from the taught questions alone: the controls below were never seen by the loop.
    scope = json.loads((home / "adapters" / adapter / "shammah.json").read_text())["scope"]
    assert scope == {"subjects": ["quenland"]}, scope
    learned = sum("zorblat" in r.lower() for r, _ in held)
    assert learned >= 4, [r for r, _ in held]
    still_right = [control_ok(r, oks) for (r, _), (_, oks) in zip(ctrl, CONTROLS, strict=True)]
    lost = [CONTROLS[i][0] for i, (b, a) in enumerate(zip(base_right, still_right, strict=True)) if b and not a]
    assert not lost, f"lost: {lost}; answers: {[r for r, _ in ctrl]}"
    assert not any("zorblat" in r.lower() for r, _ in ctrl), "the lesson does not leak into unrelated answers"
