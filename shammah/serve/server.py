"""The server's state: one engine, store, job manager and registry, shared by every request.

Requests name the adapter they want (``model``); the engine answers one request at a time and
switches adapters between requests under its generation lock (engine.Engine.stream), so a
request never sees another adapter's weights. Training (feedback jobs from the chat loop's
JobManager and dataset jobs from serve.queue) runs in worker processes, one job at a time, and
is paused while a reply is written, as in the chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from shammah.adapters.registry import Registry
from shammah.config import Config
from shammah.engine import Engine
from shammah.engine.engine import AdapterRef
from shammah.errors import ShammahError
from shammah.feedback.store import Store
from shammah.jobs import JobManager
from shammah.paths import Paths, atomic_write
from shammah.serve.client import running_server
from shammah.serve.queue import DatasetJobs

log = logging.getLogger(__name__)

DEFAULT_MODEL = "shammah"  # the model id of "the active adapter" (what learns from feedback)
HISTORY = 2000  # events kept per job for late subscribers


class ApiError(ShammahError):
    """An error answered as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ShammahError(
            f"refusing to listen on {host} without an API token: set serve.token in the config or "
            "SHAMMAH_API_TOKEN (clients send 'Authorization: Bearer <token>'), or bind 127.0.0.1"
        )


class EventHub:
    """Job events for ``GET /v1/jobs/{id}/events``: the history so far, then live ones."""

    def __init__(self):
        self.history: dict[str, list[dict]] = {}
        self.listeners: dict[str, set[asyncio.Queue]] = {}

    def publish(self, job_id: str, ev: dict) -> None:
        h = self.history.setdefault(job_id, [])
        if len(h) < HISTORY or ev.get("event") == "finished":
            h.append(ev)
        for q in self.listeners.get(job_id, ()):
            q.put_nowait(ev)

    async def follow(self, job_id: str) -> AsyncIterator[dict]:
        q: asyncio.Queue = asyncio.Queue()
        self.listeners.setdefault(job_id, set()).add(q)
        try:
            for ev in list(self.history.get(job_id, [])):
                yield ev
                if ev.get("event") == "finished":
                    return
            while True:
                ev = await q.get()
                yield ev
                if ev.get("event") == "finished":
                    return
        finally:
            self.listeners[job_id].discard(q)


class Server:
    def __init__(self, cfg: Config, paths: Paths, engine: Engine | None = None):
        self.cfg = cfg
        self.paths = paths
        self.engine = engine or Engine(cfg.model, paths.cache)
        self.store = Store(paths.db, cfg.feedback)
        self.registry = Registry(paths.adapters)
        self.hub = EventHub()
        self.slot = asyncio.Lock()
        self.jobs = JobManager(cfg, paths, self.store, self.engine, notify=lambda msg: log.info("%s", msg))
        self.jobs.slot, self.jobs.events = self.slot, self.hub.publish
        self.datasets = DatasetJobs(cfg, paths, self.store, self.slot)
        self.datasets.events = self.hub.publish
        self._writing = 0  # replies being written: training is paused while > 0
        # Every reply is generated on this one thread. Requests run one at a time anyway (the engine's
        # lock), and torch's OpenMP team belongs to the thread that calls it: replies handed from
        # thread to thread left the last team spinning beside the next one, which halved throughput
        # with 2+ concurrent clients (bench/serve.py: 2.7 -> 1.4 requests/s).
        self.gen_pool = ThreadPoolExecutor(1, thread_name_prefix="shammah-generate")
        self.url = ""

    # life cycle ---------------------------------------------------------------------------------
    async def start(self, url: str) -> None:
        self.url = url
        self.engine.start_loading()
        for note in self.jobs.recover() + self.datasets.start():
            log.warning("%s", note)
        info = {"pid": os.getpid(), "url": url, "model": self.engine.spec.name}
        atomic_write(self.paths.root / "serve.json", json.dumps(info))
        msg = self.jobs.maybe_trigger()  # a buffer already over the threshold trains now
        if msg:
            log.info("%s", msg)

    async def stop(self) -> None:
        await self.jobs.shutdown()
        await self.datasets.stop()
        self.gen_pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            if (running_server(self.paths.root) or {}).get("pid") == os.getpid():
                (self.paths.root / "serve.json").unlink()
        self.store.close()

    # requests -----------------------------------------------------------------------------------
    def require_ready(self) -> None:
        if not self.engine.ready:
            raise ApiError(
                503, f"{self.engine.spec.name} is still loading; retry shortly", headers={"Retry-After": "2"}
            )
        try:
            self.engine.load()
        except ShammahError as e:
            raise ApiError(503, f"the model failed to load: {e}") from None

    @property
    def default_adapter(self) -> str | None:
        return self.jobs.active.name

    def model_ids(self) -> list[str]:
        return [DEFAULT_MODEL, self.engine.spec.name]

    def resolve(self, model: str | None) -> AdapterRef:
        """The adapter a request's ``model`` asks for: "shammah" (or none) = the active adapter,
        the base model's id = the base alone, else a registered adapter by name."""
        name: str | None
        if not model or model == DEFAULT_MODEL:
            name = self.default_adapter
        elif model == self.engine.spec.name:
            name = None
        elif self.registry.exists(model):
            name = model
        else:
            raise ApiError(
                404,
                f"model {model!r} does not exist: use {DEFAULT_MODEL!r} (the active adapter), "
                f"{self.engine.spec.name!r} (the base model) or an adapter name from GET /v1/models",
                param="model",
                code="model_not_found",
            )
        if name is None:
            return AdapterRef(None)
        info = self.registry.get(name)
        return AdapterRef(name, info.path, info.get("base", "fingerprint"))

    @contextlib.contextmanager
    def writing(self):
        """Training pauses while any reply is written (SIGSTOP/SIGCONT, as in the chat)."""
        self._writing += 1
        if self._writing == 1:
            self.jobs.pause()
            self.datasets.pause(True)
        try:
            yield
        finally:
            self._writing -= 1
            if self._writing == 0:
                self.jobs.resume()
                self.datasets.pause(False)
