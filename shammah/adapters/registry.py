"""The adapter registry: one directory per adapter under ``$SHAMMAH_HOME/adapters``.

Each adapter is a standard PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by plain ``PeftModel.from_pretrained``)
plus ``shammah.json`` (name, created, base id + weight fingerprint, method,
hyperparameters, dataset hash, parent, feedback ids, training report) and
``train.log``. Adapters are written into a hidden staging directory and renamed
into place in one step, so a kill at any moment never leaves half an adapter
listed; hidden directories are never listed and are swept on open.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shammah.errors import ShammahError
from shammah.paths import atomic_write, ensure_dir

META = "shammah.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ALLOWED_SUFFIXES = (".json", ".safetensors", ".log", ".md", ".txt", ".jsonl")


class AdapterError(ShammahError):
    """A missing, invalid or incompatible adapter."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    meta: dict[str, Any]
    damaged: str | None = None  # why its metadata cannot be read (listed so it can be deleted)

    @property
    def created(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.meta.get("created", 0)))

    def get(self, *keys: str, default: Any = None) -> Any:
        d: Any = self.meta
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return default
            d = d[k]
        return d


def default_name(prefix: str = "adapter") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise AdapterError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' (max 100)")
    return name


def verify_files(path: Path) -> None:
    """An adapter directory may hold only JSON/safetensors/text: never pickles or code."""
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{path}: not an adapter (adapter_config.json missing)")
    if not (path / "adapter_model.safetensors").is_file():
        raise AdapterError(f"{path}: adapter_model.safetensors missing (pickled .bin weights are refused)")
    for f in path.rglob("*"):
        if f.is_file() and not f.name.endswith(ALLOWED_SUFFIXES):
            raise AdapterError(f"{f}: unexpected file type in an adapter (only JSON and safetensors are loaded)")


def check_lora(path: Path) -> dict:
    """Everything the chat checks before it loads an adapter directory, on every load (not only
    when it was registered: files can change afterwards). Returns its adapter_config.json.
    Only safetensors and JSON are read; the tensor shapes must agree with the config's rank (a
    mismatch would be copied in silently with the wrong scaling)."""
    verify_files(path)
    cfg_file = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file}: unreadable ({e}); delete the adapter and retrain") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: not a JSON object; delete the adapter and retrain")
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(
            f"{path.name} is {cfg.get('peft_type')}; the chat hot-loads LoRA-family adapters (lora, dora, "
            "lorafa) — use it from Python with PeftModel instead"
        )
    from safetensors import SafetensorError, safe_open

    weights = path / "adapter_model.safetensors"
    r, patterns = cfg.get("r"), cfg.get("rank_pattern") or {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                if ".lora_A." not in key and ".lora_B." not in key:
                    continue
                shape = f.get_slice(key).get_shape()
                want = next((v for k, v in patterns.items() if k in key), r)
                got = shape[0] if ".lora_A." in key else shape[1]
                if got != want:
                    raise AdapterError(
                        f"{weights}: {key} has rank {got} but adapter_config.json says r = {want}; "
                        "the adapter is damaged — delete it and retrain"
                    )
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{weights}: unreadable ({e}); delete the adapter and retrain") from None
    return cfg


class Registry:
    def __init__(self, root: Path):
        self.root = ensure_dir(Path(root))
        self._sweep()

    def _sweep(self) -> None:
        """Remove staging/trash left by a crash (older than a minute, so live writers are safe)."""
        for p in self.root.iterdir():
            if p.name.startswith((".staging-", ".trash-")) and time.time() - p.stat().st_mtime > 60:
                shutil.rmtree(p, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        """A registered adapter of this name. A name no adapter can have (a path, 600 bytes of
        combining marks from an HTTP client) is not one: never a path the OS refuses to stat."""
        return bool(NAME_RE.match(name)) and (self.root / name / META).is_file()

    def stage(self, name: str) -> Path:
        check_name(name)
        if self.exists(name):
            raise AdapterError(f"adapter {name!r} already exists; pick another name or delete it first")
        return Path(tempfile.mkdtemp(dir=self.root, prefix=f".staging-{name}-"))

    def commit(self, staging: Path, name: str, meta: dict[str, Any]) -> AdapterInfo:
        """Write metadata, fsync, and rename the staging directory into place (atomic)."""
        verify_files(staging)
        meta = {"name": name, "created": time.time(), **meta}
        atomic_write(staging / META, json.dumps(meta, indent=2, ensure_ascii=False))
        for f in staging.iterdir():
            os.chmod(f, 0o600)
        os.chmod(staging, 0o700)
        target = self.path(name)
        if target.exists():
            raise AdapterError(f"adapter {name!r} already exists")
        os.rename(staging, target)
        _fsync_dir(self.root)
        return self.get(name)

    def get(self, name: str) -> AdapterInfo:
        path = self.path(name)
        meta_file = path / META
        if not meta_file.is_file():
            known = ", ".join(a.name for a in self.list()[-5:]) or "none yet"
            raise AdapterError(f"no adapter named {name!r} (recent: {known}); see `shammah adapters list`")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdapterError(f"{meta_file}: unreadable metadata ({e}); delete the adapter and retrain") from None
        return AdapterInfo(name, path, meta)

    def update(self, name: str, **fields: Any) -> AdapterInfo:
        """Set top-level metadata fields (an evaluation's results), rewriting shammah.json atomically."""
        info = self.get(name)
        atomic_write(info.path / META, json.dumps({**info.meta, **fields}, indent=2, ensure_ascii=False))
        return self.get(name)

    def list(self) -> list[AdapterInfo]:
        """Every registered adapter, oldest first; one whose metadata is unreadable is listed as
        damaged (not hidden: the user has to be able to see and delete it)."""
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and not p.name.startswith(".") and (p / META).is_file():
                try:
                    out.append(self.get(p.name))
                except AdapterError as e:
                    out.append(AdapterInfo(p.name, p, {"created": p.stat().st_mtime}, damaged=str(e)))
        return sorted(out, key=lambda a: (a.meta.get("created", 0), a.name))

    def delete(self, name: str) -> AdapterInfo:
        """Remove an adapter (a damaged one too)."""
        try:
            info = self.get(name)
        except AdapterError:
            if not (self.path(name) / META).is_file():
                raise
            info = AdapterInfo(name, self.path(name), {}, damaged="unreadable metadata")
        trash = self.root / f".trash-{name}-{os.getpid()}-{time.time_ns()}"
        os.rename(info.path, trash)  # vanishes from the listing atomically
        shutil.rmtree(trash, ignore_errors=True)
        return info


def table(items: list[AdapterInfo], active: str | None) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(header, rows) of the adapter table, the same in the chat and in `shammah adapters list`."""
    rows = []
    for a in items:
        mark = "*" if a.name == active else ""
        if a.damaged:
            rows.append((mark, a.name, a.created, "damaged: delete it", "-", "-", "-", "-"))
            continue
        gate = a.get("gate")
        gate_s = "-" if not gate else ("passed" if gate.get("passed") else "rejected") + f" {gate.get('controls', '')}"
        loss = a.get("report", "final_train_loss")
        rows.append(
            (
                mark,
                a.name,
                a.created,
                str(a.get("base", "name", default="?"))[:24],
                f"{a.get('adapter_type', default='?')}/{a.get('method', default='?')}",
                str(a.get("report", "examples", default="?")),
                f"{loss:.3f}" if isinstance(loss, float) else "-",
                gate_s,
            )
        )
    return ("", "name", "created", "base", "type/method", "examples", "loss", "gate"), rows


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
