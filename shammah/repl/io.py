"""The only object that writes to the terminal.

One theme; plain text when ``NO_COLOR`` is set or the output is not a TTY.
It looks ``sys.stdout`` up on every write so prompt-toolkit's
``patch_stdout`` can route it above the prompt.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import TextIO

_STYLES = {
    "info": "\x1b[2m",  # dim
    "ok": "\x1b[32m",
    "warn": "\x1b[33m",
    "error": "\x1b[31m",
    "accent": "\x1b[36m",
}
_RESET = "\x1b[0m"
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


# Model output must not drive the terminal: drop C0/C1 control characters (ESC included)
# except newline and tab before writing a reply.
_CONTROL = dict.fromkeys(c for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t")


def printable(text: str) -> str:
    return text.translate(_CONTROL)


def color_enabled(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


class Console:
    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        color: bool | None = None,
        interactive: bool = False,
        replies_only: bool = False,
    ):
        self._out = out
        self._err = err
        self.color = color_enabled(out or sys.stdout) if color is None else color
        self.interactive = interactive
        # Scripts (like `llm` and `ollama run` piped): stdout carries the replies alone, and
        # acknowledgements, tables, notices and errors go to stderr.
        self.replies_only = replies_only
        self._mid_line = False  # a streamed reply has not ended with a newline yet

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr

    def _style(self, kind: str, text: str) -> str:
        return f"{_STYLES[kind]}{text}{_RESET}" if self.color and kind in _STYLES else text

    def _line(self, kind: str, text: str, stream: TextIO | None = None) -> None:
        if self._mid_line:  # end the streamed reply's line where it was written
            self.out.write("\n")
            self.out.flush()
            self._mid_line = False
        stream = stream or (self.err if self.replies_only else self.out)
        # Typed text comes back in tables and acknowledgements: it must not drive the terminal either.
        stream.write(self._style(kind, printable(text)) + "\n")
        stream.flush()

    def info(self, text: str) -> None:
        self._line("info", text)

    def ok(self, text: str) -> None:
        self._line("ok", text)

    def error(self, text: str) -> None:
        self._line("error", f"error: {text}", self.err)

    def notice(self, text: str) -> None:
        """Start-up information that scripts don't want mixed into replies: stderr."""
        self._line("info", text, self.err)

    def text(self, text: str) -> None:
        self._line("plain", text)

    def table(self, rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> None:
        all_rows = ([header] if header else []) + rows
        widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))] if all_rows else []
        for n, r in enumerate(all_rows):
            line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            self._line("accent" if header and n == 0 else "plain", line)

    # streaming replies -------------------------------------------------------
    def stream(self, piece: str) -> None:
        piece = printable(piece)
        if piece:
            self.out.write(piece)
            self.out.flush()
            self._mid_line = not piece.endswith("\n")

    def end_stream(self, suffix: str = "") -> None:
        if suffix:
            self.out.write(("" if not self._mid_line else " ") + self._style("info", suffix))
            self._mid_line = True
        if self._mid_line:
            self.out.write("\n")
        self.out.flush()
        self._mid_line = False

    async def spin_until(self, label: str, check, interval: float = 0.1) -> None:
        """Show ``label`` with a spinner until ``check()`` is true (interactive) or once (piped)."""
        t0 = time.monotonic()
        if not self.interactive:
            self.notice(f"{label}…")
            while not check():
                await asyncio.sleep(interval)
            return
        i = 0
        try:
            while not check():
                frame = SPINNER[i % len(SPINNER)]
                self.out.write(f"\r{self._style('info', f'{frame} {label}… {time.monotonic() - t0:.0f}s')}")
                self.out.flush()
                i += 1
                await asyncio.sleep(interval)
        finally:
            self.out.write("\r\x1b[2K" if self.color or self.interactive else "\n")
            self.out.flush()
