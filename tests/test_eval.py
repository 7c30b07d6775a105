"""`shammah eval`: metrics on small sets with known answers, chrF against sacreBLEU, and the
command end to end on a tiny model (scores, --compare, results kept in the adapter's report)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import register_adapter, subprocess_env

from shammah import evaluate
from shammah.adapters.registry import Registry


def test_chrf_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    corpora = [
        (["The capital of Quenland is Zorblat."], ["The capital of Quenland is Zorblat."]),
        (["the cat sat on the mat", "a b"], ["the cat is on the mat", "a b c d e f g"]),
        (["Zorblat.", "I do not know.", "Paris"], ["The capital is Zorblat.", "Tokyo", "Paris, France"]),
        (["完全に一致", "xy"], ["完全一致", "xyz"]),
        (["", "abc"], ["abc", "abc"]),
    ]
    for hyps, refs in corpora:
        want = sacrebleu.corpus_chrf(hyps, [refs]).score
        assert evaluate.chrf(hyps, refs) == pytest.approx(want, abs=1e-6), (hyps, refs)


def test_metrics_on_known_answers():
    refs = ["yes", "no", "no", "yes"]
    replies = ["Yes.", "no", "yes", "yes"]
    s = evaluate.score(replies, refs, [(4.0, 2), (2.0, 2)], [0.5, 1.5, 1.0, 1.0], evaluate.ALL_METRICS)
    assert s["exact"] == 0.5  # "Yes." is not exactly "yes"
    assert s["accuracy"] == 0.75  # as labels it is
    # yes: tp 2, fp 1, fn 0 -> 0.8; no: tp 1, fp 0, fn 1 -> 2/3; macro = 0.7333
    assert s["f1"] == pytest.approx((0.8 + 2 / 3) / 2, abs=1e-4)
    assert s["loss"] == 1.5 and s["perplexity"] == pytest.approx(math.exp(1.5), abs=1e-4)
    assert s["latency"] == 1.0
    assert s["json"] == 0.0
    js = evaluate.score(['{"a": 1}', "{nope"], ['{"a": 1}', '{"b": 2}'], [], [0, 0], ("json", "exact"))
    assert js == {"json": 0.5, "exact": 0.5}
    ref = '{"command": "notes", "subcommand": "add", "args": {"title": "milk", "pinned": true}}'
    half = '{"command": "notes", "subcommand": "add", "args": {"title": "eggs"}}'  # 2 of 4 fields right
    extra = '{"command": "notes", "subcommand": "add", "args": {"title": "milk", "pinned": true, "x": 1}}'
    fields = evaluate.score([ref, half, extra, "not json"], [ref] * 4, [], [0] * 4, ("fields",))["fields"]
    assert fields == pytest.approx((1 + 2 / 4 + 4 / 5 + 0) / 4, abs=1e-4)


def test_default_metrics_fit_the_references():
    assert "json" in evaluate.default_metrics(['{"cmd": "ls"}', "[1, 2]"])
    assert "fields" not in evaluate.default_metrics(['{"cmd": "ls"}', "[1, 2]"])
    assert {"json", "fields"} <= set(evaluate.default_metrics(['{"cmd": "ls"}', '{"clarify": "which?"}']))
    labels = evaluate.default_metrics(["positive", "negative", "positive", "negative", "positive", "negative"])
    assert {"accuracy", "f1"} <= set(labels)
    free = evaluate.default_metrics(["A long answer about Paris.", "Another sentence here, quite long."])
    assert "accuracy" not in free and "json" not in free and "chrf" in free
    with pytest.raises(evaluate.EvalError, match="unknown bleu"):
        evaluate.parse_metrics("exact,bleu", [])


def test_eval_command_scores_compares_and_keeps_the_results(tiny_qwen2, shammah_home, tmp_path):
    """An adapter that learned its training answers beats the base on them: a lower loss, a
    higher chrF. (A check of the eval tool on data the adapter saw, not of learning.)"""
    recs = [{"prompt": "Q", "completion": "Paris Paris Paris"}] * 4
    register_adapter(tiny_qwen2, shammah_home, "paris", recs, epochs=4, learning_rate=0.05)
    (shammah_home / "config.toml").write_text(f'[model]\nbase = "{tiny_qwen2}"\n')
    data = tmp_path / "probe.jsonl"
    data.write_text(json.dumps(recs[0]) + "\n")

    def shammah(*args: str, check: bool = True):
        env = subprocess_env(SHAMMAH_HOME=shammah_home)
        return subprocess.run(
            [sys.executable, "-m", "shammah", *args], capture_output=True, text=True, env=env, timeout=300, check=check
        )

    r = shammah("eval", "paris", "--dataset", str(data), "--compare", "base", "-n", "8", "--json")
    res = json.loads(r.stdout)["results"]
    assert set(res["paris"]) == {"exact", "chrf", "loss", "perplexity", "latency"}
    assert res["paris"]["loss"] < res["base"]["loss"] and res["paris"]["chrf"] > res["base"]["chrf"], res
    table = shammah("eval", "paris", "--dataset", str(data), "--compare", "base", "-n", "8").stdout
    assert "delta" in table and "▲" in table and "loss" in table
    kept = Registry(shammah_home / "adapters").get("paris").get("eval", "probe.jsonl")
    assert kept["metrics"]["loss"] == res["paris"]["loss"] and kept["examples"] == 1
    assert '"probe.jsonl"' in shammah("adapters", "info", "paris").stdout
    bad = shammah("eval", "nope", "--dataset", str(data), check=False)
    assert bad.returncode == 2 and "no adapter named 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    distill = tmp_path / "distill.jsonl"
    distill.write_text(json.dumps({"prompt": "Q", "teacher_prompt": "Q, in French"}) + "\n")
    bad = shammah("eval", "base", "--dataset", str(distill), check=False)
    assert bad.returncode == 2 and "distill.jsonl:1: a distill example has no reference" in bad.stderr
