"""Sinks for the trainer's progress events: JSON lines (for other processes) and a
terminal progress display (rich). Both are plain callables taking one event dict."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


class JsonLines:
    """One JSON object per line, flushed at once: what `shammah train --json` prints."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def __call__(self, event: dict[str, Any]) -> None:
        self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TerminalProgress:
    """A live progress bar on stderr with loss, eval loss, lr, grad norm, tokens/s, ETA and memory."""

    def __init__(self, stream: TextIO | None = None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = Console(file=stream or sys.stderr)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            transient=False,
        )
        self.task = None
        self.eval_loss: float | None = None

    def __enter__(self) -> TerminalProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "setup":
            self.console.print(
                f"training [bold]{ev['name']}[/] on {ev['device']} ({ev['dtype']}): "
                f"{ev['examples']} examples, {ev['validation_examples']} for validation"
            )
        elif kind == "start":
            self.task = self.progress.add_task(
                "epoch 0", total=ev["total_steps"], stats="", completed=ev.get("resumed_from_step", 0)
            )
        elif kind == "step" and self.task is not None:
            parts = [f"loss {ev['loss']:.4f}"]
            if self.eval_loss is not None:
                parts.append(f"eval {self.eval_loss:.4f}")
            if ev.get("learning_rate") is not None:
                parts.append(f"lr {ev['learning_rate']:.2e}")
            if ev.get("grad_norm") is not None:
                parts.append(f"gnorm {ev['grad_norm']:.2f}")
            parts += [f"{ev['tokens_per_s']:.0f} tok/s", f"ETA {_fmt_s(ev['eta_s'])}", f"RSS {ev['rss_mb']:.0f} MB"]
            if "vram_mb" in ev:
                parts.append(f"VRAM {ev['vram_mb']:.0f} MB")
            self.progress.update(
                self.task, completed=ev["step"], description=f"epoch {ev['epoch']:.2f}", stats="  ".join(parts)
            )
        elif kind == "eval":
            self.eval_loss = ev["eval_loss"]
