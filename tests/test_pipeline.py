"""Named trainings (`shammah pipeline`): the checked-in `notes` example end to end on a tiny
model with a scripted teacher, validation that drops what a teacher gets wrong, and a killed
generation that resumes where it stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env
from fake_teacher import FakeTeacher

from shammah.pipeline import generate as gen
from shammah.pipeline.schema import SchemaError, check_output, load

EXAMPLE = ROOT / "examples" / "notes" / "schemas" / "notes.yaml"


def project(tmp_path: Path) -> Path:
    (tmp_path / "proj" / "schemas").mkdir(parents=True)
    shutil.copy(EXAMPLE, tmp_path / "proj" / "schemas" / "notes.yaml")
    return tmp_path / "proj"


def pipeline(home: Path, root: Path, *args: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "shammah", "pipeline", "notes", *args, "--root", str(root)]
    env = subprocess_env(SHAMMAH_HOME=home)
    if kw.pop("background", False):
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, **kw)


def write_config(home: Path, base: Path, url: str, examples: int, batch: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[model]\nbase = "{base}"\n[pipeline]\nteacher_url = "{url}"\nexamples = {examples}\n'
        f"batch_size = {batch}\nsft_epochs = 2\ndpo_epochs = 1\nlearning_rate = 0.01\n"
    )


def test_the_example_schema_and_its_checks():
    s = load(EXAMPLE)
    assert set(s.commands) == {"notes", "todo", "timer"} and s.commands["timer"]["start"]["minutes"].required
    ok = {"command": "todo", "subcommand": "add", "args": {"task": "call mum", "due": "friday"}}
    assert check_output(s, ok) is None and check_output(s, {"clarify": "Which task?"}) is None
    assert "unknown command" in check_output(s, {"command": "mail", "subcommand": "add"})
    assert "unknown subcommand" in check_output(s, {"command": "todo", "subcommand": "remove"})
    assert "must be a integer" in check_output(s, {"command": "timer", "subcommand": "start", "args": {"minutes": "5"}})
    assert "must be a boolean" in check_output(
        s, {"command": "notes", "subcommand": "add", "args": {"title": "x", "pinned": "yes"}}
    )
    assert "required" in check_output(s, {"command": "timer", "subcommand": "start", "args": {}})
    assert "unknown argument" in check_output(
        s, {"command": "timer", "subcommand": "start", "args": {"minutes": 1, "x": 2}}
    )
    assert gen.is_duplicate("Add a note called Garden", [gen._words("add a NOTE called garden!")])
    assert not gen.is_duplicate("start a 5 minute timer", [gen._words("add a note called garden")])


def test_a_bad_schema_names_the_key(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text(
        "description: d\ncommands:\n  notes:\n    subcommands:\n      add:\n        args:\n          n: {type: float}\n"
    )
    with pytest.raises(SchemaError, match="commands.notes.subcommands.add.args.n.type must be one of"):
        load(bad)
    bad.write_text("description: d\ncomands: {}\n")
    with pytest.raises(SchemaError, match="unknown key"):
        load(bad)


def test_the_whole_pipeline_on_a_tiny_model(tiny_qwen2, shammah_home, tmp_path):
    root = project(tmp_path)
    with FakeTeacher() as teacher:
        write_config(shammah_home, tiny_qwen2, teacher.url, examples=24, batch=6)
        r = pipeline(shammah_home, root)
        assert r.returncode == 0, r.stderr[-4000:]
    data, models = root / "training" / "data" / "notes", root / "training" / "models" / "notes"
    report = json.loads((data / "report.json").read_text())
    assert report["accepted"] == 24 and sum(report["split"].values()) == 24
    dropped = report["dropped"]
    assert dropped["teacher answer is not a JSON array"] == 1
    assert dropped["near-duplicate input"] >= 3
    assert {"schema: unknown command", "schema: wrong argument type"} <= set(dropped) or any(
        k.startswith("schema:") for k in dropped
    ), dropped
    assert set(report["kinds"]) == {"positive", "context", "negative"}, "the mix asks for every kind"
    train = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (data / "train_val.jsonl").read_text().splitlines()]
    prefs_in = [json.loads(x) for x in (data / "pref_inputs.jsonl").read_text().splitlines()]
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in val + prefs_in}, "held out of SFT"
    s = load(EXAMPLE)
    assert all(check_output(s, json.loads(x["completion"])) is None for x in train + val)
    prefs = [json.loads(x) for x in (data / "preferences.jsonl").read_text().splitlines()]
    assert prefs and all(p["chosen"] != p["rejected"] for p in prefs)
    state = json.loads((models / "state.json").read_text())
    assert list(state["done"]) == ["generate", "sft", "preferences", "dpo", "quantize", "eval"]
    assert (models / "sft" / "adapter_model.safetensors").is_file() and (
        models / "dpo" / "adapter_config.json"
    ).is_file()
    assert (models / "gguf" / "notes-dpo-q8_0.gguf").stat().st_size > 0
    results = json.loads((models / "eval.json").read_text())["results"]
    assert list(results) == ["base", "notes-sft", "notes-dpo"]
    assert set(results["base"]) == {"exact", "json", "fields", "latency", "perplexity"}
    # SFT on the generated data fits the held-out answers better than the base model does
    assert results["notes-sft"]["perplexity"] < results["base"]["perplexity"], results
    assert "notes-dpo" in r.stdout + r.stderr and "perplexity" in r.stdout + r.stderr
    # a second run has nothing left to do
    again = pipeline(shammah_home, root)
    assert again.returncode == 0 and again.stderr.count("done already") + again.stdout.count("done already") == 6


def test_a_killed_generation_resumes_after_the_last_whole_batch(tiny_qwen2, shammah_home, tmp_path):
    root = project(tmp_path)
    progress = root / "training" / "data" / "notes" / "progress.jsonl"
    with FakeTeacher(seed=1, delay_after=3) as teacher:  # requests 4+ hang: the run is killed meanwhile
        write_config(shammah_home, tiny_qwen2, teacher.url, examples=20, batch=5)
        p = pipeline(shammah_home, root, "generate", background=True)
        deadline = time.time() + 120
        while not (progress.is_file() and len(progress.read_text().splitlines()) == 3):
            assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.1)
        time.sleep(0.5)  # blocked on the 4th request now
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    before = progress.read_text().splitlines()
    kept = [x for line in before for x in json.loads(line)["accepted"]]
    assert len(before) == 3 and 0 < len(kept) < 20
    with FakeTeacher(seed=2) as teacher:
        write_config(shammah_home, tiny_qwen2, teacher.url, examples=20, batch=5)
        r = pipeline(shammah_home, root, "generate")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resuming: {len(kept)} examples from 3 batches" in r.stdout + r.stderr
        asked = teacher.batch_requests
    after = progress.read_text().splitlines()
    assert after[:3] == before, "the batches done before the kill are kept as they were"
    every = [x for line in after for x in json.loads(line)["accepted"]]
    assert len(every) == 20 and asked == len(after) - 3, "only the missing batches were asked for"
    data = root / "training" / "data" / "notes"
    rows = sum(
        len((data / f).read_text().splitlines()) for f in ("train.jsonl", "train_val.jsonl", "pref_inputs.jsonl")
    )
    assert rows == 20
    fresh = pipeline(shammah_home, root, "generate", "--force", "--teacher-url", "http://127.0.0.1:9/v1")
    assert fresh.returncode == 2 and "cannot reach the teacher" in fresh.stderr and "Traceback" not in fresh.stderr
    assert progress.read_text().splitlines() == after, "a --force that cannot reach the teacher clears nothing"
