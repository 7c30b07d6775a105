"""Background training jobs for the chat: threshold -> snapshot -> worker process -> gate -> swap.

One :class:`JobManager` per chat. It never imports torch itself: the worker is a separate
process (``shammah.training.worker``), so a crash, OOM or cancel cannot take the chat down,
and the chat keeps answering while it trains. Progress comes back as JSON lines.

CPU share: the worker trains on all cores, and is paused (SIGSTOP/SIGCONT) while the chat
writes a reply, so replies keep their full speed and training loses only the seconds a reply
takes. (Measured alternatives on 2 cores: a 1+1 thread split kept ~91% of chat speed but
halves training; 2 chat threads beside training dropped the chat to 38%.) Where signals
are not available, ``chat_threads_while_training`` gives the thread split instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from shammah.adapters.active import ActiveAdapter
from shammah.adapters.choice import describe_summary as _describe_choice
from shammah.adapters.registry import Registry
from shammah.adapters.rule import Rule
from shammah.config import Config, LearningConfig
from shammah.engine import Engine
from shammah.feedback.compile import buffer, compile_feedback, examples_of
from shammah.feedback.revise import did_not
from shammah.feedback.store import Store
from shammah.paths import Paths, ensure_dir
from shammah.training.args import TrainArgs, build
from shammah.training.job import LoopJob, TrainJob

log = logging.getLogger(__name__)

KEEP_JOB_DIRS = 20  # job directories (data, logs) kept for inspection; older ones are removed
REPLAY_WEIGHT = 0.25  # a replayed lesson's sampling weight relative to a new one (see _snapshot)
HOLDOUT_MIN = 10  # with at least this many new items, 20% are held out for the gate


def learning_args(lc: LearningConfig) -> TrainArgs:
    """The chat's learning settings as training settings. The rest are fixed for the online loop:
    alpha = 2 x rank, no dropout (a dozen examples: dropout only slows the lesson), a constant
    rate (the gate's snapshots compare points of one schedule), no checkpoints (a job is short, an
    interrupted one restarts from its feedback, and writing them cost seconds per job), prompts
    cut to 512 tokens."""
    return build(
        (
            "learning",
            {
                "method": "auto",
                "adapter_type": "lora",
                "rank": lc.rank,
                "alpha": 2.0 * lc.rank,
                "dropout": 0.0,
                "epochs": lc.epochs,
                "learning_rate": lc.learning_rate,
                "batch_size": lc.batch_size,
                "scheduler": "constant",
                "save_steps": 0,
                "threads": lc.train_threads,
                "max_length": 512,
                "seed": lc.seed,
            },
        )
    )


def stopped(pid: int, timeout: float = 0.05) -> bool:
    """Wait (briefly) until a SIGSTOPped process has really stopped: the signal is delivered
    asynchronously, and a busy worker would otherwise take the first milliseconds of a reply."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stat.read_text().rsplit(") ", 1)[1].split()[0] in ("T", "t", "Z", "X"):
                return True
        except (OSError, IndexError):  # no /proc (macOS) or the process is gone
            return False
        time.sleep(0.001)
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_job(d: Path) -> LoopJob | None:
    try:
        return LoopJob.read(d / "job.json")
    except Exception:  # a job directory from an older version, or half-written: nothing to recover
        return None


@dataclass
class Job:
    id: str
    trigger: str
    feedback_ids: list[int]
    holdout_ids: list[int]
    started: float = field(default_factory=time.time)  # the feedback snapshot was taken then
    proc: asyncio.subprocess.Process | None = None
    status: str = "starting"
    progress: dict = field(default_factory=dict)
    result: dict | None = None
    cancelled: bool = False


_last_id = ""


def _new_id() -> str:
    """job-<date>-<time>-<ms>, unique in this process (its adapter is learned-<the same stamp>)."""
    global _last_id
    while True:
        t = time.time()
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S', time.localtime(t))}-{int(t * 1000) % 1000:03d}"
        if job_id != _last_id:
            _last_id = job_id
            return job_id
        time.sleep(0.001)


def _held_out_ids(lj: LoopJob | None) -> list[int]:
    return lj.job.meta.get("holdout_feedback_ids", []) if lj is not None else []


class _Adopted:
    """A worker started with ``subprocess.Popen``, driven from asyncio as the job code drives an
    ``asyncio.subprocess.Process`` (pid, returncode, stdout lines, wait, terminate, kill).

    Why not asyncio's own: a spare worker is started from synchronous code and may never get a job;
    an ``asyncio.create_subprocess_exec`` still in flight when the event loop closes is cancelled
    mid-spawn, and that cancellation waited forever in tests."""

    def __init__(self, popen: subprocess.Popen):
        self.popen, self.pid = popen, popen.pid
        self.stdout: asyncio.StreamReader | None = None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    async def attach(self) -> None:
        """Read its stdout from the running loop from now on."""
        reader = asyncio.StreamReader(limit=2**20)
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self.popen.stdout
        )
        self.stdout = reader

    def terminate(self) -> None:
        self.popen.terminate()

    def kill(self) -> None:
        self.popen.kill()

    async def wait(self) -> int:
        while self.popen.poll() is None:  # polled: a waiting thread would hold up the loop's shutdown
            await asyncio.sleep(0.05)
        return self.popen.returncode

    def close(self) -> None:
        """End it (SIGKILL also ends a paused one) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait()
        for f in (self.popen.stdin, self.popen.stdout):
            with contextlib.suppress(OSError):
                f.close()


def _why_refused(tried: dict) -> str:
    """What made the gate refuse one trained step (an entry of its "tried"): the controls it lost,
    else its lessons not learned, else its held-out loss."""
    if tried.get("lost"):
        return ", ".join(tried["lost"])
    if tried.get("unlearned"):
        return f"it had learned {tried['learned']:.0%} of what its lessons taught"
    return "held-out feedback got worse"


def _chose(event: dict) -> str:
    """What a job's "choice" event says it did (adapters/choice.py), in words ("" for none)."""
    if event.get("answers"):
        return f"{_describe_choice(event)}, without training"
    said = [
        f"{n} answer(s) from a closed set said as you taught them, without training"
        if (n := event.get("told"))
        else "",
        f"{n} question(s) the set answered left to the model, which learns your answer"
        if (n := event.get("outside"))
        else "",
    ]
    return "; ".join(p for p in said if p)


def _refusal(gate: dict) -> str:
    """Why no trained step was kept: the final one's reason, and the earlier ones' when they kept
    every control but had not learned their lessons (training/online.py MIN_LEARNED)."""
    first, *rest = gate.get("tried") or [{"controls": gate["controls"], "lost": gate["controls_lost"]}]
    why = f"controls {first['controls']} vs {gate['controls_current']} ({_why_refused(first)})"
    unlearned = [t["learned"] for t in rest if t.get("unlearned") and not t["lost"]]
    if unlearned:
        why += f"; the earlier steps that kept them had learned at most {max(unlearned):.0%} of what the lessons taught"
    return why


class JobManager:
    def __init__(
        self, cfg: Config, paths: Paths, store: Store, engine: Engine, notify: Callable[[str], None] | None = None
    ):
        self.cfg = cfg
        self.paths = paths
        self.store = store
        self.engine = engine
        self.registry = Registry(paths.adapters)
        self.active = ActiveAdapter(store)
        self.notify = notify or (lambda msg: None)
        # every progress event of a job, and its end: (job id, event) (the server streams them)
        self.events: Callable[[str, dict], None] = lambda job_id, ev: None
        # held while a job trains: a server shares it with its dataset jobs (one job at a time)
        self.slot: asyncio.Lock | None = None
        self.current: Job | None = None
        self.queued: tuple[str, str] | None = None  # (trigger, job id) of the run after this one
        self._task: asyncio.Task | None = None
        self._failed_ids: frozenset[int] = frozenset()
        self._debounce: asyncio.Task | None = None
        self._saved_threads: int | None = None
        self._spare: _Adopted | None = None  # a worker that waits for the next job (prewarm)
        self._stopped: list = []  # the worker processes pause() stopped, for resume()

    # state --------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """A job runs, or is about to start once the feedback settles."""
        return any(t is not None and not t.done() for t in (self._task, self._debounce))

    def status_line(self) -> str:
        j = self.current
        if j is None:
            return ""
        p = j.progress
        if p.get("event") == "step":
            eta = int(p.get("eta_s") or 0)
            return (
                f"training {j.id}: epoch {p['epoch']:.1f} step {p['step']}/{p['total_steps']} "
                f"loss {p['loss']:.3f} ETA {eta // 60}:{eta % 60:02d}" + (" (+1 queued)" if self.queued else "")
            )
        return f"training {j.id}: {j.status}…"

    # start-up ---------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """At chat start: jobs whose chat died while they trained (SIGKILL, a crash, a power cut)
        are marked interrupted and their checkpoints removed (their feedback never left the
        buffer); old job directories are pruned; and what the last job failed on is remembered,
        so a restart does not retrain exactly the feedback that was just rejected."""
        notes = []
        for row in self.store.queued_jobs("feedback"):  # queued behind a job when its chat stopped
            if row["pid"] is None or (row["pid"] != os.getpid() and not alive(row["pid"])):
                why = "not run: the chat stopped; the feedback stayed in the buffer"
                self.store.job_finished(row["id"], "cancelled", why)
        for job_id, pid in self.store.running_jobs():
            if pid is not None and pid != os.getpid() and alive(pid):
                continue  # another chat on this home is training it
            if (self.store.job(job_id) or {}).get("kind") == "dataset":
                continue  # the server's dataset jobs recover themselves (shammah.serve.queue)
            self.store.job_finished(
                job_id,
                "interrupted",
                "interrupted: the chat stopped while it trained; the feedback stayed in the buffer",
            )
            lj = _read_job(self.paths.root / "jobs" / job_id)
            if lj is not None and lj.job.name:
                shutil.rmtree(lj.job.checkpoints_root / lj.job.name, ignore_errors=True)
            notes.append(
                f"Training job {job_id} was interrupted when the chat stopped; its feedback is still in the buffer."
            )
        self._prune_job_dirs()
        last = self.store.last_finished_job()
        if last is not None and last["status"] in ("failed", "rejected"):
            held = _held_out_ids(_read_job(self.paths.root / "jobs" / last["id"]))
            self._failed_ids = frozenset(last["feedback_ids"] + held)
        return notes

    def _prune_job_dirs(self) -> None:
        root = self.paths.root / "jobs"
        if not root.is_dir():
            return
        running = {job_id for job_id, _ in self.store.running_jobs()}
        dirs = sorted((d for d in root.iterdir() if d.is_dir() and d.name not in running), key=lambda d: d.name)
        for d in dirs[:-KEEP_JOB_DIRS]:
            shutil.rmtree(d, ignore_errors=True)

    # triggering -------------------------------------------------------------------------------
    def maybe_trigger(self) -> str | None:
        """Start a job if auto-training is on and the weighted buffer reached the threshold."""
        lc = self.cfg.learning
        buf = buffer(self.store)
        if lc.auto_train and lc.prewarm and buf.weighted > 0:
            self.prewarm()
        if not lc.auto_train or buf.weighted < lc.threshold:
            return None
        pending = self._pending_ids()
        if pending == self._failed_ids:  # the last job with exactly this feedback failed or was rejected
            return None
        if self._task is not None and not self._task.done():  # a job trains: queue another run
            return self.start("threshold")
        # Wait for the feedback to settle: a /critical is usually followed by a /fix within seconds,
        # and training on the half-finished item would only mean training again.
        first = self._debounce is None or self._debounce.done()
        if not first:
            self._debounce.cancel()
        self._debounce = asyncio.get_running_loop().create_task(self._start_after(self.cfg.learning.settle_seconds))
        return (
            f"Training buffer reached {lc.threshold:g}: learning starts in the background shortly." if first else None
        )

    async def _start_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.notify(self.start("threshold"))

    def start(self, trigger: str) -> str:
        return self.submit(trigger)[1]

    def submit(self, trigger: str) -> tuple[str | None, str]:
        """Train the feedback buffer now, or after the running job: (the job's id, what to tell the
        user); no id when there is nothing new to learn."""
        if self._task is not None and not self._task.done():
            if self.queued is None:
                self.queued = (trigger, _new_id())
                self.store.job_queued(self.queued[1], "feedback", trigger)
            return self.queued[1], "A training job is running; another run is queued and starts when it ends."
        if not examples_of(compile_feedback(self.store, 0)[0]):
            return None, "Nothing new to learn: rate some replies first (/good, /critical <note>, /fix <answer>)."
        job_id = _new_id()
        self._task = asyncio.get_running_loop().create_task(self._run(trigger, job_id))
        return job_id, "Training started in the background; keep chatting. /train status, /train cancel, /train wait."

    def drop_queued(self, why: str) -> None:
        """Cancel the run queued behind the running job (the running job goes on)."""
        if self.queued is not None:
            self.store.job_finished(self.queued[1], "cancelled", why)
            self.events(self.queued[1], {"event": "finished", "status": "cancelled", "message": why})
            self.queued = None

    def pause(self) -> None:
        """Stop the worker while the chat writes a reply (see the module docstring)."""
        self._signal_worker(True)

    def resume(self) -> None:
        self._signal_worker(False)

    def _signal_worker(self, stop: bool) -> None:
        """SIGSTOP/SIGCONT the job's worker and the spare one (its imports would take a reply's CPU)."""
        if not self.cfg.learning.pause_while_replying:
            return
        import signal

        sig = getattr(signal, "SIGSTOP" if stop else "SIGCONT", None)
        if sig is None:
            return
        j = self.current
        procs = [p for p in (j.proc if j is not None else None, self._spare) if p is not None]
        if not stop:
            # every process stopped, wherever it went since: the spare handed a job while the chat
            # replied is neither the spare nor yet the job's process, and left stopped it hung the
            # chat, which waits on its output (CI, test_second_trigger_is_queued_...)
            procs, self._stopped = self._stopped + procs, []
        for proc in procs:
            if proc.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
                if stop:
                    self._stopped.append(proc)
                    stopped(proc.pid)

    # the spare worker ---------------------------------------------------------------------
    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", SHAMMAH_PARENT_PID=str(os.getpid()))
        if self.cfg.learning.train_threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.cfg.learning.train_threads)
        return env

    def prewarm(self) -> None:
        """Start the next job's worker now, while the user is still rating: its imports are seconds
        (~5 on 2 cores) that would otherwise come between the last /fix and the first training
        step. It waits, paused with the other worker while the chat replies, until a job is handed
        to it; leaving the chat ends it (and it dies with the chat, like every worker)."""
        if self._spare is not None and self._spare.returncode is None:
            return
        self._spare = _Adopted(
            subprocess.Popen(
                [sys.executable, "-m", "shammah.training.worker", "--wait", str(self.paths.root / "jobs")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # the worker writes to the job's worker.log once it has one
                env=self._worker_env(),
            )
        )

    async def _take_spare(self, job_file: Path) -> _Adopted | None:
        """The spare worker, handed ``job_file``; None if there is none (or it died)."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        try:
            spare.popen.stdin.write(f"{job_file}\n".encode())
            spare.popen.stdin.close()
        except OSError:  # it died: a fresh worker will do
            spare.close()
            return None
        await spare.attach()
        return spare

    async def _end_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()

    async def shutdown(self) -> None:
        """Leaving the chat: stop a running job (its feedback stays in the buffer for next time)."""
        await self._end_spare()
        if self._debounce is not None and not self._debounce.done():
            self._debounce.cancel()
        if self.current is not None:
            self.notify("Stopping the background training (the feedback stays in the buffer).")
            await self.cancel()

    async def cancel(self) -> str:
        j = self.current
        self.drop_queued("cancelled before it started; the feedback stays in the buffer")
        if self._debounce is not None and not self._debounce.done():
            self._debounce.cancel()
            if j is None:
                return "Cancelled the training that was about to start; the feedback stays in the buffer."
        if j is None:
            if self._task is not None and not self._task.done():  # created, not yet started
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                return "Cancelled the training that was about to start; the feedback stays in the buffer."
            return "No training job is running."
        j.cancelled = True
        if j.proc is not None:  # else the worker is being started: _run stops it as soon as it exists
            self.resume()  # a stopped process cannot act on SIGTERM
            j.proc.terminate()
        await self.wait()
        return f"Cancelled {j.id}; its feedback stays in the buffer."

    async def wait(self) -> None:
        """Until the running job (and a queued one, and their swaps) are finished."""
        while self.running:
            for t in (self._debounce, self._task):
                if t is not None and not t.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(t)

    # the job ---------------------------------------------------------------------------------
    def _pending_ids(self) -> frozenset[int]:
        return frozenset(i for x in compile_feedback(self.store, 0)[0] for i in x.feedback_ids)

    def _snapshot(self, trigger: str, job_id: str) -> tuple[Job, Path]:
        lc = self.cfg.learning
        snapshot_time = time.time()
        new, replay = compile_feedback(self.store, lc.replay_limit)
        held: list = []
        if len(new) >= HOLDOUT_MIN:  # whole turns are held out, so the gate sees questions it never trained on
            held = random.Random(len(new)).sample(new, max(1, len(new) // 5))
        trained = [x for x in new if x not in held]
        stamp = job_id.removeprefix("job-")
        ids = [i for x in trained for i in x.feedback_ids]
        holdout_ids = [i for x in held for i in x.feedback_ids]
        job = Job(job_id, trigger, ids, holdout_ids, snapshot_time)
        d = ensure_dir(self.paths.root / "jobs" / job_id)
        # Replayed lessons are already in the adapter this job starts from: they are rehearsed, not
        # taught. At full weight they took half of the lesson draws from a new lesson taught second
        # (bench/lessons.py --sequence quenland,pellucid, seeds 0-2: pellucid 0%/100%/67%, quenland
        # 83%/100%/100%); at REPLAY_WEIGHT the new lessons get about the draws they would get alone
        # (67%/100%/100%, quenland 100% x3).
        rehearse = [replace(e, weight=e.weight * REPLAY_WEIGHT) for e in examples_of(replay, lc.note_only)]
        own = examples_of(trained, lc.note_only)
        if not lc.preference_pairs:  # see LearningConfig.preference_pairs
            own, rehearse = ([e for e in x if e.kind != "pair"] for x in (own, rehearse))
        examples = own + rehearse
        replay_ids = [i for x in replay for i in x.feedback_ids]
        parent = self.active.name  # the default adapter (a server answers each request with the one it names)
        if parent is not None and not self.registry.exists(parent):  # deleted by another process
            self.notify(
                f"The active adapter {parent} was deleted from disk; this job starts a fresh adapter "
                "(it still answers from memory until the swap)."
            )
            parent = None
        LoopJob(
            TrainJob(
                base=self.cfg.model.base,
                cache_dir=self.paths.cache,
                registry_root=self.paths.adapters,
                checkpoints_root=self.paths.root / "checkpoints",
                train=examples,
                args=learning_args(lc),
                name=f"learned-{stamp}",
                parent=parent,
                meta={
                    "job": job_id,
                    "trigger": trigger,
                    "feedback_ids": job.feedback_ids,
                    "turn_ids": [x.turn_id for x in trained],
                    "replayed_feedback_ids": replay_ids,
                    "holdout_feedback_ids": holdout_ids,
                },
            ),
            lessons=len(own),
            anchors=lc.anchors,
            anchor_loss=lc.anchor_loss,
            anchor_span=lc.anchor_span,
            contrast=lc.contrast_anchors,
            anchor_cache=self.paths.cache,
            gate=lc.gate,
            holdout=examples_of(held, lc.note_only),
            stop_at_accuracy=lc.stop_at_accuracy,
            scoped_epochs=lc.scoped_epochs,
            subject_epochs=lc.subject_epochs,
            scope=lc.scope,
        ).write(d)
        self.store.job_started(job_id, trigger, parent, job.feedback_ids)
        return job, d

    def _finish(self, job: Job, status: str, adapter: str | None, message: str) -> None:
        self.store.job_finished(job.id, status, message, adapter, (job.result or {}).get("done"))
        self.events(job.id, {"event": "finished", "status": status, "adapter": adapter, "message": message})
        self.notify(message)

    def _limit_chat_threads(self, on: bool) -> None:
        n = self.cfg.learning.chat_threads_while_training
        if not n or "torch" not in sys.modules:
            return
        import torch

        if on:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(min(n, self._saved_threads))
        elif self._saved_threads:
            torch.set_num_threads(self._saved_threads)

    async def _run(self, trigger: str, job_id: str) -> None:
        if self.slot is None:
            await self._run_job(trigger, job_id)
            return
        async with self.slot:  # another kind of job (a server's dataset job) may hold it
            await self._run_job(trigger, job_id)

    async def _run_job(self, trigger: str, job_id: str) -> None:
        try:
            job, d = self._snapshot(trigger, job_id)
        except Exception as e:  # e.g. a full disk: say so, keep the chat and the feedback
            log.exception("could not prepare a training job")
            why = f"Could not start training ({type(e).__name__}: {e}); the feedback stays in the buffer."
            with contextlib.suppress(Exception):
                self.store.job_queued(job_id, "feedback", trigger)
            with contextlib.suppress(Exception):
                self.store.job_finished(job_id, "failed", why)
            self.events(job_id, {"event": "finished", "status": "failed", "message": why})
            self.notify(why)
            return
        self.current = job
        t0 = time.perf_counter()
        self.notify(f"Learning from {len(job.feedback_ids)} new feedback item(s) in the background ({job.id}).")
        self._limit_chat_threads(True)
        try:
            with (d / "worker.log").open("wb") as errlog:
                job.proc = await self._take_spare(d / "job.json") or await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "shammah.training.worker",
                    str(d / "job.json"),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=errlog,
                    env=self._worker_env(),
                )
                if job.cancelled:  # cancelled while the process was starting
                    job.proc.terminate()
                job.status = "loading the model"
                async for raw in job.proc.stdout:
                    try:
                        ev = json.loads(raw)
                    except json.JSONDecodeError:
                        continue
                    self._on_event(job, ev)
                rc = await job.proc.wait()
            self._limit_chat_threads(False)
            await self._conclude(job, rc, time.perf_counter() - t0, d)
        except asyncio.CancelledError:
            if job.proc and job.proc.returncode is None:
                job.proc.kill()
            why = "cancelled: the chat stopped; the feedback stays in the buffer"
            self.store.job_finished(job.id, "cancelled", why)
            self.events(job.id, {"event": "finished", "status": "cancelled", "message": why})
            raise
        except Exception as e:  # never let a job failure reach the chat loop
            log.exception("job %s failed", job.id)
            self._finish(
                job, "failed", None, f"Training failed ({type(e).__name__}: {e}); feedback kept for the next try."
            )
        finally:
            self._limit_chat_threads(False)
            self.current = None
            if self.queued:
                trainable = bool(examples_of(compile_feedback(self.store, 0)[0]))
                if trainable and self._pending_ids() != self._failed_ids:  # never rerun exactly what just failed
                    (trig, queued_id), self.queued = self.queued, None
                    self._task = asyncio.get_running_loop().create_task(self._run(trig, queued_id))
                else:
                    self.drop_queued("not run: nothing new to learn since the last job")

    def _on_event(self, job: Job, ev: dict) -> None:
        self.events(job.id, ev)
        kind = ev.get("event")
        if kind in ("step", "eval"):
            job.status = "training"
            if kind == "step":
                job.progress = ev
        elif kind == "anchors":
            job.status = "answering anchor prompts"
        elif kind == "gate":
            job.status = "checking"
            job.result = {**(job.result or {}), "gate": ev}
        elif kind in ("rule", "notes", "choice"):
            job.result = {**(job.result or {}), kind: ev}
        elif kind in ("done", "error"):
            job.result = {**(job.result or {}), kind: ev}

    async def _conclude(self, job: Job, rc: int, seconds: float, d: Path) -> None:
        res = job.result or {}
        if job.cancelled:
            self._finish(job, "cancelled", None, f"Training {job.id} cancelled; the feedback stays in the buffer.")
            return
        if rc != 0 or "done" not in res:
            why = res.get("error", {}).get("message") or f"the training process exited with code {rc}"
            self._failed_ids = frozenset(job.feedback_ids + job.holdout_ids)
            if res.get("error", {}).get("not_learned"):
                self._finish(job, "failed", None, f"Not learned: {why}. The feedback stays in the buffer.")
                return
            self._finish(
                job,
                "failed",
                None,
                f"Training failed: {why} (log: {d / 'worker.log'}). The feedback stays in the buffer for the next try.",
            )
            return
        done = res["done"]
        name = done["adapter"]
        gate = res.get("gate")
        said = res.get("rule") or {}  # the job's "rule" event
        rule = Rule.recorded(said.get("rule"))
        chose = _chose(res.get("choice") or {})
        # the lessons only wrote a rule out (or one the user dropped), or answered from a set: nothing was trained
        if not done.get("steps") and (rule or said.get("dropped") or chose):
            shown = [rule.on_replies() if rule else "", chose]
            if not rule and said.get("dropped"):
                shown[0] = "the lessons only showed a dropped style rule"
            summary = "; ".join(p for p in shown if p) + f"; nothing else to train, {seconds:.0f} s"
        else:
            summary = (
                f"{done['examples']} examples + {done.get('anchors', 0)} anchors, final loss "
                f"{done['final_train_loss']:.3f}, {seconds:.0f} s"
                + (f"; {rule.on_replies()}" if rule else "")
                + (f"; {chose}" if chose else "")
            )
        if n := (res.get("notes") or {}).get("stated"):
            summary += f"; {n} note(s) learned as you wrote them (the model did not follow them)"
        if n := (res.get("notes") or {}).get("unfollowed"):
            summary += f"; {n} note(s) not learned: with them in mind the model {did_not(res['notes']['missing'])}"
        if gate is not None and not gate["passed"]:
            self._failed_ids = frozenset(job.feedback_ids + job.holdout_ids)
            self._finish(
                job,
                "rejected",
                name,
                f"Trained {name} ({summary}) but kept the current adapter: "
                f"{_refusal(gate)}. Try it anyway with /adapters load {name}.",
            )
            return
        swap_s = await self.activate(name)
        self.store.mark_trained(job.feedback_ids, name, job.started)
        extra = f", controls {gate['controls']}" if gate else ""
        if gate and gate.get("rule_only"):
            what = [w for w, on in (("the rule", rule), ("the closed set", chose)) if on] or ["the rule"]
            kept = " and ".join(what) + (" were" if len(what) > 1 else " was")
            extra = f"; only {kept} kept, no trained step passed the gate: {_refusal(gate)}"
        elif gate and gate.get("step") != gate.get("final_step"):
            first = gate["tried"][0]
            extra += (
                f"; kept step {gate['step']} of {gate['final_step']}: the final adapter lost controls "
                f"({first['controls']} vs {gate['controls_current']})"
            )
        self._finish(
            job,
            "done",
            name,
            f"Learned: now answering with {name} ({summary}{extra}; swapped in {swap_s * 1000:.0f} ms).",
        )
        log.info("job %s done: %s", job.id, name)

    # activating adapters (also used by /adapters) ------------------------------------------
    async def activate(self, name: str | None) -> float:
        """Swap to ``name`` (None = base) between turns; remember it and the previous one."""
        path = fp = None
        if name is not None:
            info = self.registry.get(name)
            path, fp = info.path, info.get("base", "fingerprint")
        loop = asyncio.get_running_loop()
        previous = self.active.name
        secs = await loop.run_in_executor(None, lambda: self.engine.activate(name, path, fp))
        self.active.switched(previous, name)
        return secs
