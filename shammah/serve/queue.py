"""Dataset training jobs submitted to the server (``POST /v1/jobs``), queued in SQLite.

A job is ``shammah train --json`` in a worker process with the request's dataset and settings,
so the server and the command line train exactly alike, and a crash or OOM in training cannot
take the server down. Jobs run one at a time, sharing one slot with the chat loop's feedback
jobs (:class:`shammah.jobs.JobManager`). The request is stored with the job: after a restart,
queued jobs still run, and a job the restart interrupted is marked ``interrupted`` and can be
resumed from its last checkpoint (``POST /v1/jobs/{id}/resume``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from shammah.adapters.registry import Registry, check_name
from shammah.config import Config
from shammah.errors import ShammahError
from shammah.feedback.store import Store
from shammah.jobs import alive, stopped
from shammah.paths import Paths, ensure_dir
from shammah.training.args import TrainArgs, build

log = logging.getLogger(__name__)

SETTINGS = tuple(f.name for f in fields(TrainArgs))


class JobError(ShammahError):
    """A job request that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def check_spec(spec: dict, registry: Registry) -> dict:
    """Validate a dataset job request before it is queued: the files exist, every setting is a
    known training setting within its range, the names are usable. Returns the normalized spec."""
    dataset = spec.get("dataset")
    if not dataset:
        raise JobError("dataset: give the path of a JSONL file on the server's machine", param="dataset")
    for key in ("dataset", "validation"):
        if spec.get(key):
            p = Path(spec[key]).expanduser()
            if not p.is_file():
                raise JobError(f"{key}: no such file {p}", param=key)
            spec[key] = str(p.resolve())
    settings = spec.get("settings") or {}
    try:
        build(("request settings", settings))
    except ShammahError as e:
        raise JobError(f"settings: {e}".replace("\n", " "), param="settings") from None
    for key in ("name", "parent"):
        if spec.get(key):
            try:
                check_name(spec[key])
            except ShammahError as e:
                raise JobError(f"{key}: {e}", param=key) from None
    if spec.get("name") and registry.exists(spec["name"]):
        raise JobError(f"name: an adapter named {spec['name']!r} exists; pick another name", 409, "name")
    if spec.get("parent") and not registry.exists(spec["parent"]):
        raise JobError(f"parent: no adapter named {spec['parent']!r}", 404, "parent")
    return spec


def train_command(spec: dict, base: str, resume: bool) -> list[str]:
    """The ``shammah train`` command line that runs ``spec``."""
    cmd = [sys.executable, "-m", "shammah", "train", "--dataset", spec["dataset"], "--json", "--yes"]
    cmd += ["--name", spec["name"], "--base", base]
    if spec.get("validation"):
        cmd += ["--validation", spec["validation"]]
    if spec.get("parent"):
        cmd += ["--parent", spec["parent"]]
    for key, value in (spec.get("settings") or {}).items():
        value = ",".join(value) if isinstance(value, list | tuple) else value
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if resume:
        cmd.append("--resume")
    return cmd


class DatasetJobs:
    """The server's dataset jobs: submit, run one at a time, cancel, resume."""

    def __init__(self, cfg: Config, paths: Paths, store: Store, slot: asyncio.Lock):
        self.cfg = cfg
        self.paths = paths
        self.store = store
        self.slot = slot
        self.registry = Registry(paths.adapters)
        self.events: Callable[[str, dict], None] = lambda job_id, ev: None
        self.progress: dict[str, dict] = {}  # job id -> its latest step/eval event (running jobs)
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._cancelled: set[str] = set()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self.current: str | None = None

    # start-up ------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Mark jobs whose server died while they trained as interrupted (their checkpoints are kept
        for a resume), and start running the queue."""
        notes = []
        for job_id, pid in self.store.running_jobs():
            row = self.store.job(job_id)
            if row["kind"] != "dataset" or (pid is not None and pid != os.getpid() and alive(pid)):
                continue
            msg = "interrupted: the server stopped while it trained; POST /v1/jobs/{id}/resume continues it"
            self.store.job_finished(job_id, "interrupted", msg.replace("{id}", job_id))
            notes.append(f"job {job_id} was interrupted by a restart (resumable)")
        self._runner = asyncio.get_running_loop().create_task(self._run_queue())
        return notes

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for proc in list(self._procs.values()):  # left 'running': the next start marks it interrupted
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
                await proc.wait()

    # requests ----------------------------------------------------------------------------------
    def submit(self, spec: dict) -> str:
        spec = check_spec(dict(spec), self.registry)
        t = time.time()
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S', time.localtime(t))}-{secrets.token_hex(3)}"
        spec["name"] = spec.get("name") or f"trained-{job_id.removeprefix('job-')}"
        self.store.job_queued(job_id, "dataset", "api", spec)
        self._wake.set()
        return job_id

    def resume(self, job_id: str) -> None:
        row = self.store.job(job_id)
        if row is None or row["kind"] != "dataset":
            raise JobError(f"no dataset job {job_id!r}", 404)
        if row["status"] not in ("interrupted", "failed", "cancelled"):
            raise JobError(
                f"job {job_id} is {row['status']}: only an interrupted, failed or cancelled job resumes", 409
            )
        spec = {**row["spec"], "resume": True}
        self.store.db.execute(
            "UPDATE jobs SET status = 'queued', spec = ?, finished_at = NULL, message = NULL WHERE id = ?",
            (json.dumps(spec), job_id),
        )
        self._wake.set()

    async def cancel(self, job_id: str) -> None:
        row = self.store.job(job_id)
        if row["status"] == "queued":
            why = "cancelled before it started"
            self.store.job_finished(job_id, "cancelled", why)
            self.events(job_id, {"event": "finished", "status": "cancelled", "message": why})
            return
        proc = self._procs.get(job_id)
        if proc is None:
            raise JobError(f"job {job_id} is {row['status']}: nothing to cancel", 409)
        self._cancelled.add(job_id)
        with contextlib.suppress(ProcessLookupError):
            if hasattr(signal, "SIGCONT"):
                os.kill(proc.pid, signal.SIGCONT)  # a paused worker cannot act on SIGTERM
            proc.terminate()

    def pause(self, stop: bool) -> None:
        """SIGSTOP/SIGCONT the worker while the server writes a reply (as the chat does)."""
        sig = getattr(signal, "SIGSTOP" if stop else "SIGCONT", None)
        if sig is None or not self.cfg.learning.pause_while_replying:
            return
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
                if stop:
                    stopped(proc.pid)

    # running -----------------------------------------------------------------------------------
    async def _run_queue(self) -> None:
        while True:
            queued = self.store.queued_jobs("dataset")
            if not queued:
                self._wake.clear()
                await self._wake.wait()
                continue
            row = queued[0]
            async with self.slot:
                if (self.store.job(row["id"]) or {}).get("status") != "queued":  # cancelled while waiting
                    continue
                try:
                    await self._run(row)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # never let one job stop the queue
                    log.exception("job %s failed", row["id"])
                    self._finish(row["id"], "failed", f"failed: {type(e).__name__}: {e}")

    async def _run(self, row: dict) -> None:
        job_id, spec = row["id"], row["spec"]
        d = ensure_dir(self.paths.root / "jobs" / job_id)
        self.store.job_started(job_id, "api", spec.get("parent"), [])
        self.current = job_id
        self.events(job_id, {"event": "started"})
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", SHAMMAH_HOME=str(self.paths.root))
        env["SHAMMAH_PARENT_PID"] = str(os.getpid())
        result: dict = {}
        try:
            with (d / "worker.log").open("ab") as errlog:
                proc = await asyncio.create_subprocess_exec(
                    *train_command(spec, self.cfg.model.base, bool(spec.get("resume"))),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=errlog,
                    env=env,
                )
                self._procs[job_id] = proc
                async for raw in proc.stdout:
                    try:
                        ev = json.loads(raw)
                    except json.JSONDecodeError:
                        continue
                    if ev.get("event") in ("step", "eval"):
                        self.progress[job_id] = {**self.progress.get(job_id, {}), **ev}
                    if ev.get("event") in ("done", "error"):
                        result[ev["event"]] = ev
                    self.events(job_id, ev)
                rc = await proc.wait()
        finally:
            self._procs.pop(job_id, None)
            self.current = None
        name = spec["name"]
        if job_id in self._cancelled:
            self._cancelled.discard(job_id)
            self._finish(job_id, "cancelled", "cancelled; its checkpoints are kept: POST /v1/jobs/{id}/resume")
        elif rc == 0 and self.registry.exists(name):
            report = result.get("done") or self.registry.get(name).meta.get("report")
            self._finish(job_id, "done", f"trained adapter {name}", name, report)
        else:
            why = result.get("error", {}).get("message") or _last_line(d / "worker.log") or f"exit code {rc}"
            self._finish(job_id, "failed", f"failed: {why} (log: {d / 'worker.log'})")

    def _finish(self, job_id: str, status: str, message: str, adapter: str | None = None, report=None) -> None:
        message = message.replace("{id}", job_id)
        self.store.job_finished(job_id, status, message, adapter, report)
        self.progress.pop(job_id, None)
        self.events(job_id, {"event": "finished", "status": status, "adapter": adapter, "message": message})


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""
