"""The training worker: ``python -m shammah.training.worker JOB.json``.

Runs one job in its own process (a crash, OOM or cancel cannot take the chat down) and
reports progress as JSON lines on stdout; the last line is ``done`` or ``error``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def die_with_parent() -> None:
    """A worker whose chat is gone (SIGKILL, a crash) must not train on as an orphan: on Linux the
    kernel sends it SIGTERM when its parent exits (prctl PR_SET_PDEATHSIG). Elsewhere the next
    progress line it writes into the closed pipe ends it."""
    import os

    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    parent = os.environ.get("SHAMMAH_PARENT_PID")
    if parent and os.getppid() != int(parent):  # the chat died before the line above ran
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    from shammah.errors import ShammahError
    from shammah.training.progress import JsonLines

    out = JsonLines(sys.stdout)
    try:
        from shammah.training.job import LoopJob
        from shammah.training.online import train_loop

        train_loop(LoopJob.read(Path(argv[0])), out)
    except ShammahError as e:
        out({"event": "error", "message": str(e)})
        return 1
    except Exception as e:  # reported to the chat as one line; the traceback goes to stderr (the job log)
        import traceback

        traceback.print_exc()
        out({"event": "error", "message": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
