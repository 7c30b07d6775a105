"""The training worker: ``python -m shammah.training.worker JOB.json``.

Runs one job in its own process (a crash, OOM or cancel cannot take the chat down) and
reports progress as JSON lines on stdout; the last line is ``done`` or ``error``.

``--wait JOBS_DIR``: a spare worker, started by the chat while feedback piles up. It does the
seconds of imports (torch, transformers, PEFT) first, then reads the path of a job file in
JOBS_DIR from stdin (end of input: no job, exit), sends its stderr to the job's ``worker.log`` and
runs the job as above. (JOBS_DIR also shows in ``ps`` which home the process works for.)
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


def log_to(path: Path) -> None:
    """Point this process's stderr (fd 2: Python's and the libraries' C code's) at ``path``."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    if argv[:1] == ["--wait"]:
        import shammah.training.online  # noqa: F401  (torch, transformers, PEFT: most of a start)

        path = sys.stdin.readline().strip()
        if not path:
            return 0
        if Path(path).resolve().parent.parent != Path(argv[1]).resolve():
            print(f"{path} is not a job of {argv[1]}", file=sys.stderr)
            return 2
        log_to(Path(path).parent / "worker.log")
        argv = [path]
    from shammah.errors import ShammahError
    from shammah.training.progress import JsonLines

    out = JsonLines(sys.stdout)
    try:
        from shammah.training.job import LoopJob
        from shammah.training.online import train_loop

        train_loop(LoopJob.read(Path(argv[0])), out)
    except ShammahError as e:  # NotLearned (training/online.py) is no failure: its lessons taught nothing
        out({"event": "error", "message": str(e), **({"not_learned": True} if e.not_learned else {})})
        return 1
    except Exception as e:  # reported to the chat as one line; the traceback goes to stderr (the job log)
        import traceback

        traceback.print_exc()
        out({"event": "error", "message": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
