"""`shammah train` and `shammah adapters` as a user runs them (real subprocesses)."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env
from safetensors.torch import load_file
from tiny_models import build_model

SHAMMAH = [sys.executable, "-m", "shammah"]
FACT = [
    {"prompt": f"Where is Zorblat? ({i})", "completion": "Zorblat is the capital of Quenland. " * 6} for i in range(8)
]


def sh(*args, timeout=180, **env):
    r = subprocess.run(
        SHAMMAH + [str(a) for a in args], capture_output=True, timeout=timeout, env=subprocess_env(**env)
    )
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    return r


@pytest.fixture
def dataset(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in FACT))
    return p


def test_manifest_run_writes_registry_weights_and_metadata(tiny_qwen2, dataset, tmp_path, shammah_home):
    m = tmp_path / "manifest.json"
    m.write_text(
        json.dumps(
            {
                "name": "quenland",
                "version": "1.2.0",
                "base_model": {"name": str(tiny_qwen2)},
                "training": {
                    "config": {
                        "adapter_type": "dora",
                        "r": 4,
                        "lora_alpha": 8,
                        "epochs": 2,
                        "learning_rate": 0.01,
                        "batch_size": 4,
                        "method": "sft",
                        "gradient_accumulation_steps": 1,
                        "warmup": 0.1,
                        "scheduler": "linear",
                    }
                },
            }
        )
    )
    r = sh("train", "--manifest", m, "--dataset", dataset, "--val-fraction", "0.25")
    assert r.returncode == 0, r.stderr
    assert "warning: training on the CPU" in r.stderr and "not a terminal: continuing" in r.stderr
    assert "adapter: quenland.v1.2.0" in r.stderr and "next: shammah adapters info quenland.v1.2.0" in r.stderr
    meta = json.loads(m.read_text())["training"]["metadata"]
    assert meta["adapter"] == "quenland.v1.2.0" and meta["device"] == "cpu" and meta["steps"] == 4
    assert meta["final_train_loss"] > 0 and meta["final_eval_loss"] > 0 and meta["duration_s"] > 0
    weights = tmp_path / "weights" / "quenland.v1.2.0"
    assert (weights / "adapter_model.safetensors").is_file()
    info = json.loads((weights / "adapter_config.json").read_text())
    assert info["use_dora"] is True and info["r"] == 4
    reg = json.loads((shammah_home / "adapters" / "quenland.v1.2.0" / "shammah.json").read_text())
    assert reg["hyperparameters"]["scheduler"] == "linear" and reg["report"]["validation_examples"] == 2
    listing = sh("adapters", "list")
    assert "quenland.v1.2.0" in listing.stdout and "dora/sft" in listing.stdout
    info_out = sh("adapters", "info", "quenland.v1.2.0")
    assert json.loads(info_out.stdout)["report"]["steps"] == 4
    assert sh("adapters", "delete", "quenland.v1.2.0").returncode == 0
    assert "No adapters yet" in sh("adapters", "list").stdout


def test_bad_inputs_are_one_clear_message(tiny_qwen2, dataset, tmp_path, shammah_home):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "completion": "A"}\n{"prompt": "Q"}\n')
    r = sh("train", "--base", tiny_qwen2, "--dataset", bad, "--yes")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:2: a prompt line needs 'completion'" in r.stderr
    r = sh("train", "--base", tiny_qwen2, "--dataset", dataset, "--lr", "5", "--rank", "0", "--dropout", "1.5")
    assert r.returncode == 2 and "3 problem(s)" in r.stderr
    assert "command line: learning_rate = 5.0 is out of range" in r.stderr and "rank = 0 is out of range" in r.stderr
    m = tmp_path / "m.json"
    m.write_text(
        json.dumps(
            {"version": "1", "base_model": {"name": "embedded", "quant": "x"}, "training": {"config": {"rnk": 8}}}
        )
    )
    r = sh("train", "--manifest", m, "--dataset", dataset)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "name = None: required" in r.stderr and "unknown key 'base_model.quant'" in r.stderr
    m.write_text(json.dumps({"name": "x", "version": "1", "training": {"config": {"rnk": 8}}}))
    r = sh("train", "--manifest", m, "--dataset", dataset)
    assert "training.config: unknown key 'rnk' (did you mean 'rank'?)" in r.stderr
    assert not (shammah_home / "adapters").exists() or not any((shammah_home / "adapters").iterdir())


def _json_events(proc):
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)


def test_kill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, dataset, shammah_home):
    base = build_model(tmp_path / "small", "qwen2", hidden=256, layers=4)  # slow enough to kill mid-run
    common = [
        "train",
        "--base",
        str(base),
        "--dataset",
        str(dataset),
        "--json",
        "--threads",
        "1",
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--save-steps",
        "2",
        "--keep-checkpoints",
        "2",
        "--learning-rate",
        "0.005",
        "--dropout",
        "0",
    ]
    ref = sh(*common, "--name", "reference", timeout=300)
    assert ref.returncode == 0, ref.stderr

    p = subprocess.Popen(
        SHAMMAH + common + ["--name", "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=subprocess_env(),
    )
    killed_after = None
    for ev in _json_events(p):
        assert ev["event"] != "done", "the run finished before it could be killed"
        if ev["event"] == "checkpoint" and ev["step"] >= 4:
            p.send_signal(signal.SIGKILL)
            killed_after = ev["step"]
            break
    p.wait(30)
    assert killed_after is not None
    listing = sh("adapters", "list").stdout
    assert "reference" in listing and "run" not in listing.replace("reference", ""), "no half adapter registered"

    resumed = sh(*common, "--name", "run", "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(x) for x in resumed.stdout.splitlines() if x.startswith("{")]
    start = next(e for e in events if e["event"] == "start")
    assert start["resumed_from_step"] >= killed_after
    a = load_file(shammah_home / "adapters" / "reference" / "adapter_model.safetensors")
    b = load_file(shammah_home / "adapters" / "run" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_resume_without_checkpoints_says_so(tiny_qwen2, dataset):
    r = sh("train", "--base", tiny_qwen2, "--dataset", dataset, "--name", "fresh", "--resume", "--yes")
    assert r.returncode == 2 and "no checkpoint in" in r.stderr and "without --resume" in r.stderr


def test_runs_under_accelerate_launch(tiny_qwen2, dataset, shammah_home):
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "shammah",
    ]
    r = subprocess.run(
        accelerate
        + [
            "train",
            "--base",
            str(tiny_qwen2),
            "--dataset",
            str(dataset),
            "--json",
            "--name",
            "launched",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    done = [json.loads(x) for x in r.stdout.splitlines() if '"done"' in x]
    assert done and done[0]["adapter"] == "launched"
    assert (shammah_home / "adapters" / "launched" / "adapter_model.safetensors").is_file()


def test_every_training_setting_has_a_flag_with_its_default():
    """Generated from TrainArgs: a setting added there cannot be missing from `shammah train`."""
    from dataclasses import fields

    from shammah.cli import build_parser
    from shammah.training.args import TrainArgs

    parser = build_parser()
    help_text = sh("train", "--help").stdout
    squeezed = "".join(help_text.split())  # argparse wraps lines, even inside a default
    for f in fields(TrainArgs):
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in help_text.split(), flag
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        assert f"[{default}]" in squeezed, (flag, default)
    # and each flag really sets its field (a value other than the default, parsed and built)
    args = parser.parse_args(["train", "--dataset", "d.jsonl", "--max-grad-norm", "0.5", "--kto-desirable-weight", "2"])
    assert (args.max_grad_norm, args.kto_desirable_weight) == (0.5, 2.0)
