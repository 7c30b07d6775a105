import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def shammah_home(tmp_path, monkeypatch):
    """Every test gets its own SHAMMAH_HOME; nothing touches the user's files or the network."""
    home = tmp_path / "home"
    monkeypatch.setenv("SHAMMAH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in ("SHAMMAH_MODEL", "SHAMMAH_DEVICE", "SHAMMAH_DTYPE", "SHAMMAH_THREADS", "SHAMMAH_LOG", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory) -> Path:
    """One SHAMMAH_HOME for the integration tests, so the GGUF is dequantized once per run."""
    return tmp_path_factory.mktemp("embedded-home")


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def register_adapter(base, home, name, records=None, **settings):
    """Train a small adapter for real (in-process) and register it in ``home``; its AdapterInfo.
    ``records`` are data lines (default: one Q/A); ``settings`` are training settings."""
    from shammah.adapters.registry import Registry
    from shammah.paths import Paths
    from shammah.training.args import build
    from shammah.training.data import parse_record
    from shammah.training.trainer import TrainJob, train

    paths = Paths(home).ensure()
    train(
        TrainJob(
            base=str(base),
            cache_dir=paths.cache,
            registry_root=paths.adapters,
            checkpoints_root=paths.root / "checkpoints",
            train=[parse_record(r) for r in records or [{"prompt": "Q", "completion": "A"}]],
            args=build(("test", {"epochs": 1, "rank": 4, **settings})),
            name=name,
        )
    )
    return Registry(paths.adapters).get(name)


def gate_on_tiny_controls(base, monkeypatch):
    """A tiny PEFT model (LoRA still zero) whose gate controls are three prompts with the base
    model's own answers as the right ones: (model, tokenizer, base answers). The untied random
    output layer makes the tiny model say varied words, not blank lines."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shammah.engine.generate import generate_batch
    from shammah.training import online

    tok = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    base_model.lm_head.weight = torch.nn.Parameter(torch.randn_like(base_model.lm_head.weight) * 0.5)
    model = get_peft_model(base_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    prompts = ["alpha", "beta", "gamma"]
    with model.disable_adapter():
        answers = generate_batch(model, tok, [[{"role": "user", "content": p}] for p in prompts], online.GATE_TOKENS)
    monkeypatch.setattr(online, "CONTROLS", tuple((p, (a.lower(),)) for p, a in zip(prompts, answers, strict=True)))
    assert all(answers), "the tiny model says something to each control"
    return model, tok, answers


def scramble_lora(model) -> None:
    """Large random LoRA weights: an adapter that changes every answer."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 2.0)
