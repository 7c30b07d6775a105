"""Adapter manifests: ``name``, ``version``, ``base_model`` and ``training.config`` in, training
metadata written back out (atomically) after a run, weights copied to ``weights/<name>.v<version>/``.

    {"name": "support-tone", "version": "1.0.0",
     "base_model": {"name": "embedded", "quantization": null},
     "training": {"config": {"adapter_type": "lora", "rank": 16, "alpha": 32, "epochs": 3,
                             "learning_rate": 2e-4, "batch_size": 4, "method": "sft"}}}
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shammah.adapters.registry import NAME_RE
from shammah.errors import ConfigError
from shammah.paths import atomic_write, ensure_dir

TOP_KEYS = {"name", "version", "base_model", "training", "description", "author", "license", "tags", "metadata"}


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    version: str
    base: str | None
    quantization: str | None
    config: dict[str, Any]
    raw: dict[str, Any]

    @property
    def adapter_name(self) -> str:
        return f"{self.name}.v{self.version}"

    @property
    def weights_dir(self) -> Path:
        return self.path.parent / "weights" / self.adapter_name


def load(path: Path) -> Manifest:
    path = Path(path)
    src = str(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], src) from None
    except json.JSONDecodeError as e:
        raise ConfigError([f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"], src) from None
    if not isinstance(raw, dict):
        raise ConfigError(["the manifest must be a JSON object"], src)
    problems = [f"unknown key '{k}' (expected: {', '.join(sorted(TOP_KEYS))})" for k in raw if k not in TOP_KEYS]
    name, version = raw.get("name"), raw.get("version")
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.append(f"name = {name!r}: required; letters, digits, '.', '_' or '-'")
    if not isinstance(version, str | int | float) or isinstance(version, bool) or not str(version).strip():
        problems.append(f'version = {version!r}: required, e.g. "1.0.0"')
    base_model = raw.get("base_model", {})
    base = quant = None
    if isinstance(base_model, str):
        base = base_model
    elif isinstance(base_model, dict):
        base = base_model.get("name")
        quant = base_model.get("quantization")
        if base is not None and not isinstance(base, str):
            problems.append(f"base_model.name = {base!r}: must be a string")
        for k in base_model:
            if k not in ("name", "quantization", "revision"):
                problems.append(f"unknown key 'base_model.{k}' (expected: name, quantization)")
        if quant not in (None, "none", "int4", "4bit", "nf4"):
            problems.append(f'base_model.quantization = {quant!r}: use null or "int4"')
    else:
        problems.append('base_model must be an object like {"name": "embedded"}')
    training = raw.get("training", {})
    config: dict[str, Any] = {}
    if not isinstance(training, dict):
        problems.append("training must be an object with a 'config' object")
    else:
        config = training.get("config", {})
        if not isinstance(config, dict):
            problems.append("training.config must be an object")
            config = {}
    if problems:
        raise ConfigError(problems, src)
    if quant in ("4bit", "nf4"):
        quant = "int4"
    return Manifest(path, name, str(version), base, quant, dict(config), raw)


def write_back(m: Manifest, metadata: dict[str, Any]) -> None:
    """Record the run in the manifest (training.metadata), atomically."""
    raw = json.loads(m.path.read_text())
    raw.setdefault("training", {})["metadata"] = metadata
    atomic_write(m.path, json.dumps(raw, indent=2, ensure_ascii=False) + "\n")


def export_weights(m: Manifest, adapter_dir: Path) -> Path:
    target = m.weights_dir
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ensure_dir(tmp.parent)
    shutil.copytree(adapter_dir, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
