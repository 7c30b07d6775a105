"""`shammah train`: manifest / config / flags -> validated job -> trainer -> registry."""

from __future__ import annotations

import argparse
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from shammah.config import Config, _toml_loads
from shammah.errors import ConfigError
from shammah.paths import Paths
from shammah.training.args import TrainArgs

FLAG_KEYS = tuple(f.name for f in fields(TrainArgs))  # every training setting has its flag


def add_arguments(p) -> None:
    p.add_argument("--manifest", type=Path, help="adapter manifest (JSON): name, version, base_model, training.config")
    p.add_argument("--dataset", type=Path, required=True, help="training data (JSONL)")
    p.add_argument("--validation", type=Path, help="validation data (JSONL); default: --val-fraction of --dataset")
    p.add_argument("--config", dest="train_config", type=Path, metavar="TOML", help="training settings file")
    p.add_argument("--name", help="adapter name (default: from the manifest, else timestamped)")
    p.add_argument("--base", help="base model (default: the manifest's, else model.base)")
    p.add_argument("--parent", help="continue training this registered adapter")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue an interrupted run from its latest (or the named) checkpoint",
    )
    p.add_argument("--json", action="store_true", help="print progress as JSON lines on stdout")
    p.add_argument("--yes", "-y", action="store_true", help="don't ask before training on a CPU")
    g = p.add_argument_group("training settings (override the manifest and --config; default in brackets)")
    types = typing.get_type_hints(TrainArgs)
    for f in fields(TrainArgs):
        md, default = f.metadata, f.default
        if types[f.name] == tuple[str, ...]:  # target_modules
            kw: dict[str, Any] = {"type": _comma_list, "metavar": "A,B,..."}
            default = ",".join(default)
        elif md["choices"]:
            kw = {"choices": md["choices"]}
        else:
            kw = {"type": types[f.name], "metavar": "N" if types[f.name] is int else "X"}
        help_text = f"{md['doc']} [{default}]".replace("%", "%%")  # argparse formats help with %
        g.add_argument(f"--{f.name.replace('_', '-')}", help=help_text, **kw)
    g.add_argument("--lr", dest="learning_rate", type=float, help=argparse.SUPPRESS)


def _comma_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _toml_layer(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        data = _toml_loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except Exception as e:
        raise ConfigError([f"not valid TOML: {e}"], str(path)) from None
    return str(path), data.get("training", data)


def confirm_cpu(device: str, yes: bool, err) -> bool:
    if device != "cpu" or yes:
        return True
    err.write("warning: training on the CPU: expect seconds per step (a GPU is 10-100x faster).\n")
    if not sys.stdin.isatty():
        err.write("(not a terminal: continuing; pass --yes to silence this)\n")
        return True
    err.write("Continue? [y/N] ")
    err.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def main(args, cfg: Config, paths: Paths) -> int:
    from shammah.adapters.registry import default_name
    from shammah.training import args as targs
    from shammah.training import data, manifest

    out, err = sys.stdout, sys.stderr
    m = manifest.load(args.manifest) if args.manifest else None
    layers = []
    if args.train_config:
        layers.append(_toml_layer(args.train_config))
    if m is not None:
        mc = dict(m.config)
        if m.quantization:
            mc["quantization"] = m.quantization
        layers.append((f"{m.path} training.config", mc))
    flags = {k: getattr(args, k, None) for k in FLAG_KEYS}
    layers.append(("command line", {k: v for k, v in flags.items() if v is not None}))
    a = targs.build(*layers)
    base = args.base or (m.base if m and m.base else None) or cfg.model.base
    examples = data.load_jsonl(args.dataset)
    if args.validation:
        train_ex, val_ex = examples, data.load_jsonl(args.validation)
    else:
        train_ex, val_ex = data.split(examples, a.val_fraction, a.seed)
    data.check_method(train_ex, a.method)
    name = args.name or (m.adapter_name if m else default_name("adapter"))

    from shammah.engine.loader import pick_device
    from shammah.training.progress import JsonLines, TerminalProgress
    from shammah.training.trainer import TrainJob, train

    if not confirm_cpu(pick_device(a.device), args.yes or args.json, err):
        err.write("cancelled.\n")
        return 1
    job = TrainJob(
        base=base,
        cache_dir=paths.cache,
        registry_root=paths.adapters,
        checkpoints_root=paths.root / "checkpoints",
        train=train_ex,
        val=val_ex,
        args=a,
        name=name,
        parent=args.parent,
        resume=args.resume,
        dataset_hash=data.dataset_hash(examples),
        meta={"dataset": str(args.dataset.resolve()), "manifest": str(m.path.resolve()) if m else None},
    )
    t0 = time.time()
    if args.json:
        result = train(job, JsonLines(out))
    else:
        with TerminalProgress(err) as bar:
            result = train(job, bar)
    r = result.report
    if m is not None:
        weights = manifest.export_weights(m, result.adapter.path)
        manifest.write_back(
            m,
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
                "device": r["device"],
                "duration_s": r["duration_s"],
                "final_train_loss": r["final_train_loss"],
                "final_eval_loss": r["final_eval_loss"],
                "steps": r["steps"],
                "adapter": result.adapter.name,
                "weights": str(weights.relative_to(m.path.parent)),
                "dataset_hash": job.dataset_hash,
            },
        )
    if not args.json:
        ev = f", eval loss {r['final_eval_loss']:.4f}" if r["final_eval_loss"] is not None else ""
        err.write(
            f"\ndone in {r['duration_s']:.1f} s: {r['steps']} steps, train loss {r['final_train_loss']:.4f}{ev}, "
            f"{r['tokens_per_s']:.0f} tok/s\n"
            f"adapter: {result.adapter.name}\n  saved in {result.adapter.path}\n"
            + (f"  weights copied to {m.weights_dir}\n" if m else "")
            + f"next: shammah adapters info {result.adapter.name}\n"
        )
    return 0
