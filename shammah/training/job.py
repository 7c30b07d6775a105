"""A training run as data, and its one file format.

:class:`TrainJob` is any run (``shammah train``, tests); :class:`LoopJob` is a run of the chat's
learning loop: a TrainJob plus what the loop composes around it (anchors against leaks, the gate,
held-out feedback). Torch-free, so the chat builds and writes one without loading the ML stack;
the worker process reads the same file back. ``write``/``read`` walk the dataclass fields, so a
field added here travels to the worker without a hand-copied dict on either side.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shammah.paths import atomic_write
from shammah.training.args import TrainArgs, build
from shammah.training.data import Example, load_jsonl, write_jsonl


@dataclass
class TrainJob:
    base: str
    cache_dir: Path
    registry_root: Path
    checkpoints_root: Path
    train: list[Example]
    args: TrainArgs
    val: list[Example] = field(default_factory=list)
    name: str = ""
    parent: str | None = None  # registered adapter to continue from
    resume: bool | str = False  # True = latest checkpoint of this run, or a checkpoint path
    dataset_hash: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # extra metadata (feedback ids, manifest, ...)


@dataclass
class LoopJob:
    job: TrainJob
    anchors: int = 0  # general prompts answered by the base model, held against leaks
    anchor_loss: str = "kl"  # kl: the base model's token distribution; sft: its greedy text
    anchor_span: str = "opening"  # opening: the base answer's first sentence is held; answer: all of it
    contrast: int = 0  # other subjects the lesson's own questions are asked about, as anchors (0 = none)
    anchor_share: float = 0.6  # fraction of sampled examples that are anchors
    anchor_cache: Path | None = None  # directory for the base model's cached anchor/control answers
    gate: bool = False  # compare with the current adapter before it may be swapped in
    holdout: list[Example] = field(default_factory=list)  # feedback kept out of training, for the gate
    scoped_epochs: int = 0  # epochs for a job whose adapter answers only inside its scope (0 = job.args.epochs)
    subject_epochs: int = 0  # epochs when that scope is subjects only (0 = scoped_epochs)
    stop_at_accuracy: float = 0.0  # end training once greedy reads back this share of the lessons (0 = off)
    scope: str = "auto"  # auto: by subject, else by form (adapters/scope.py); subjects; everywhere
    lessons: int = -1  # how many of job.train come first as this job's own lessons (the rest are replayed); -1: unknown

    def write(self, d: Path) -> Path:
        """``d/job.json`` plus one JSONL file per example list (readable by ``shammah train`` too)."""
        spec = _dump(self, d, "")
        atomic_write(d / "job.json", json.dumps(spec, indent=2))
        return d / "job.json"

    @classmethod
    def read(cls, path: Path) -> LoopJob:
        return _load(cls, json.loads(Path(path).read_text()), Path(path).parent)


def _dump(obj, d: Path, prefix: str) -> dict:
    hints = typing.get_type_hints(type(obj))
    out: dict[str, Any] = {}
    for f in fields(obj):
        v, t = getattr(obj, f.name), hints[f.name]
        if t == list[Example]:
            fname = f"{prefix}{f.name}.jsonl"
            write_jsonl(v, d / fname)
            out[f.name] = fname
        elif t is TrainJob:
            out[f.name] = _dump(v, d, "")
        elif t is TrainArgs:
            out[f.name] = v.to_dict()
        elif isinstance(v, Path):
            out[f.name] = str(v)
        else:
            out[f.name] = v
    return out


def _load(cls, spec: dict, d: Path):
    hints = typing.get_type_hints(cls)
    kw: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in spec:
            continue
        v, t = spec[f.name], hints[f.name]
        if t == list[Example]:
            v = _examples(d / v)
        elif t is TrainJob:
            v = _load(TrainJob, v, d)
        elif t is TrainArgs:
            v = build(("job file", v))
        elif v is not None and Path in _members(t):
            v = Path(v)
        kw[f.name] = v
    return cls(**kw)


def _examples(path: Path) -> list[Example]:
    # load_jsonl refuses an empty file (a user's dataset must have examples); a job's may be empty
    return load_jsonl(path) if path.stat().st_size else []


def _members(t) -> tuple:
    union = isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union
    return typing.get_args(t) if union else (t,)
