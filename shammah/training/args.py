"""Training hyperparameters: one frozen dataclass, validated up front, all problems at once.

Sources, later ones winning: defaults < ``--config train.toml`` ([training] table or top
level) < manifest ``training.config`` < command-line flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from shammah.config import _f, check_fields
from shammah.errors import ConfigError

QWEN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainArgs:
    method: str = _f(
        "auto",
        "loss per example kind; auto = SFT for targets, DPO for pairs, KTO for labelled, ranking for ranked",
        choices=("auto", "sft", "dpo", "kto", "ranking"),
    )
    adapter_type: str = _f("lora", "adapter kind", choices=("lora", "dora", "ia3", "lorafa", "prompt"))
    rank: int = _f(16, "LoRA/DoRA/LoRA-FA rank", lo=1, hi=1024)
    alpha: float = _f(32.0, "LoRA scaling alpha", lo=0.01, hi=8192.0)
    dropout: float = _f(0.05, "adapter dropout", lo=0.0, hi=0.9)
    target_modules: tuple[str, ...] = field(
        default=QWEN_TARGETS, metadata={"doc": "modules that get an adapter", "lo": None, "hi": None, "choices": None}
    )
    num_virtual_tokens: int = _f(16, "soft-prompt length for adapter_type = prompt", lo=1, hi=1024)
    epochs: int = _f(3, "passes over the training data", lo=1, hi=1000)
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = run all epochs)", lo=0, hi=10_000_000)
    learning_rate: float = _f(2e-4, "peak learning rate", lo=1e-7, hi=1.0)
    batch_size: int = _f(4, "examples per device per step", lo=1, hi=4096)
    grad_accum: int = _f(1, "gradient accumulation steps", lo=1, hi=4096)
    scheduler: str = _f(
        "cosine", "learning-rate schedule", choices=("linear", "cosine", "constant", "constant_with_warmup")
    )
    warmup_ratio: float = _f(0.0, "fraction of steps spent warming up", lo=0.0, hi=0.5)
    weight_decay: float = _f(0.0, "AdamW weight decay", lo=0.0, hi=1.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm", lo=0.0, hi=1000.0)
    max_length: int = _f(1024, "longest tokenized example; prompts are cut from the left", lo=16, hi=1_048_576)
    gradient_checkpointing: str = _f(
        "auto",
        "recompute activations in the backward pass (less memory, ~30% more time); "
        "auto = when a batch holds more than 1024 tokens",
        choices=("auto", "on", "off"),
    )
    beta: float = _f(0.1, "DPO/KTO temperature", lo=0.001, hi=10.0)
    kto_desirable_weight: float = _f(1.0, "KTO weight of desirable examples", lo=0.0, hi=100.0)
    kto_undesirable_weight: float = _f(1.0, "KTO weight of undesirable examples", lo=0.0, hi=100.0)
    ranking_margin: float = _f(0.1, "margin of the pairwise ranking loss (on mean token log-prob)", lo=0.0, hi=100.0)
    teacher_max_tokens: int = _f(
        128, "longest teacher answer generated for distillation examples without a completion", lo=1, hi=8192
    )
    val_fraction: float = _f(0.0, "share of the data held out for validation (0 = none)", lo=0.0, hi=0.5)
    save_steps: int = _f(
        50, "checkpoint every N optimizer steps and at each epoch end (0 = no checkpoints)", lo=0, hi=10_000_000
    )
    keep_checkpoints: int = _f(3, "most recent checkpoints kept", lo=1, hi=1000)
    early_stopping_patience: int = _f(
        0, "stop after N evaluations without a better validation loss (0 = off)", lo=0, hi=1000
    )
    seed: int = _f(42, "random seed (data order, sampling, init)", lo=0, hi=2**31 - 1)
    device: str = _f("auto", "training device", choices=("auto", "cpu", "cuda", "mps"))
    dtype: str = _f(
        "auto",
        "training precision (auto = float32 on CPU, bfloat16 on CUDA)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    quantization: str = _f(
        "none", "base weights: none, or int4 (bitsandbytes NF4, CUDA only)", choices=("none", "int4")
    )
    threads: int = _f(0, "CPU threads (0 = all cores)", lo=0, hi=1024)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


# Names people bring from PEFT/TRL/axolotl manifests.
ALIASES = {
    "r": "rank",
    "lora_r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "per_device_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "grad_accumulation": "grad_accum",
    "gradient_accumulation": "grad_accum",
    "warmup": "warmup_ratio",
    "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler",
}


def build(*layers: tuple[str, dict[str, Any]]) -> TrainArgs:
    """Merge (source, values) layers over the defaults; raise one ConfigError listing every problem."""
    merged: dict[str, Any] = {}
    problems: list[str] = []
    for source, body in layers:
        body = {ALIASES.get(k, k): v for k, v in body.items() if v is not None}
        accepted, errs = check_fields(TrainArgs, body, "")
        problems += [f"{source}: {e}" for e in errs]
        merged.update(accepted)
    if problems:
        raise ConfigError(problems, "training settings")
    return TrainArgs(**merged)
