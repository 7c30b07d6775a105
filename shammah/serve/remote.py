"""The chat on a running ``shammah serve`` for the same home: no second model load, one trainer.

When a server runs on this home with the same base model, the chat (``repl.commands.ChatSession``)
talks to it through these two stand-ins for the engine and the job manager, with the same methods
the session already calls:

- replies stream from ``/v1/chat/completions`` (model "shammah": the active adapter); the server
  records each reply as a turn, and the chat rates that turn in the shared store as usual;
- ratings, fixes and accepted rewrites are written to the shared SQLite store by the chat (it is
  the same database, and the store serializes writers), then ``/v1/feedback/check`` lets the
  server train when the buffer crosses the threshold, by the same rule as in a chat of its own;
- adapters are loaded and deleted through ``/v1/adapters`` (the server answers with them);
- the job in the status bar and its end come from polling ``/v1/feedback``.

Training belongs to the server: leaving the chat does not stop it. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote

from shammah.adapters.active import ActiveAdapter
from shammah.adapters.registry import Registry
from shammah.engine.resolve import ModelSpec
from shammah.errors import ShammahError
from shammah.feedback.store import Store
from shammah.serve.client import call, stream_chat

log = logging.getLogger(__name__)

POLL_S = 1.0


@dataclass(frozen=True)
class Piece:
    """What the session reads of a streamed chunk (engine.generate.Chunk without torch)."""

    text: str
    finish_reason: str | None = None
    new_tokens: int = 0
    seconds: float = 0.0


class Server:
    """Where the server listens, and the token to show it."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def __call__(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
        return call(self.url, self.token, method, path, body, timeout)


class RemoteEngine:
    """The engine surface the chat uses, answered by the server."""

    ready = True  # the server loaded the model before the chat attached (client.reachable)

    def __init__(self, server: Server, spec: ModelSpec, store: Store):
        self.server, self.spec, self.store = server, spec, store
        self.active = ActiveAdapter(store)

    def start_loading(self) -> None:
        pass

    def load(self) -> None:
        pass

    @property
    def adapter(self) -> str | None:
        return self.active.name  # the server's default adapter is the store's active one

    def gen_params(self, **overrides) -> dict:
        return overrides

    def info(self) -> dict[str, str]:
        return {
            "model": self.spec.name,
            "adapter": self.adapter or "none (base model)",
            "server": f"{self.server.url} (shammah serve: replies and training run there)",
        }

    def stream(self, messages: list[dict], params: dict | None = None, *, stop=None, info=None) -> Iterator[Piece]:
        """Stream a reply. A reply with the config's sampling (no ``params``) is a chat turn: the
        server records it and ``info["turn_id"]`` names it. With ``params`` (the note-guided
        rewrite, greedy) it is no turn of its own. An interrupted reply is not recorded by the
        server (it never finished it); the session records it itself, as without a server."""
        info = info if info is not None else {}
        body: dict = {"model": "shammah", "messages": messages, "stream_options": {"include_usage": True}}
        names = {"temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_tokens", "seed": "seed"}
        body.update({names[k]: v for k, v in (params or {}).items() if k in names})
        body["store"] = params is None
        t0 = time.perf_counter()
        cid, finish, tokens = None, None, 0
        chunks = stream_chat(self.server.url, self.server.token, body, meta=info)
        try:
            for chunk in chunks:
                cid = chunk.get("id", cid)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", ()):
                    finish = choice.get("finish_reason") or finish
                    if choice["delta"].get("content"):
                        yield Piece(choice["delta"]["content"])
                if stop is not None and stop.is_set():
                    finish = "interrupted"
                    break
        finally:
            chunks.close()  # closes the connection: the server stops writing
        if finish != "interrupted" and body["store"] and cid is not None:
            info["turn_id"] = self.store.turn_of_completion(cid)
        yield Piece("", finish or "stop", tokens, time.perf_counter() - t0)


class RemoteRegistry(Registry):
    """Reads the shared adapter directory; deletes through the server, which refuses an adapter
    it answers with or trains from."""

    def __init__(self, root, server: Server):
        super().__init__(root)
        self.server = server

    def delete(self, name: str):
        info = self.get(name)
        self.server("DELETE", f"/v1/adapters/{quote(name)}")
        return info


class RemoteJobs:
    """The job-manager surface the chat uses; the server's job manager does the work."""

    def __init__(self, server: Server, spec: ModelSpec, store: Store, adapters_dir):
        self.server, self.spec, self.store = server, spec, store
        self.registry = RemoteRegistry(adapters_dir, server)
        self.active = ActiveAdapter(store)
        self.notify: Callable[[str], None] = lambda msg: None
        self._state: dict = {}  # the last /v1/feedback "training" answer
        self._seen: set[str] = set()  # jobs seen running: their end is told once
        self._poller: asyncio.Task | None = None

    # what the session reads ---------------------------------------------------------------
    @property
    def running(self) -> bool:
        return bool(self._state.get("pending"))

    def status_line(self) -> str:
        line = self._state.get("status") or ""
        return f"{line} (on the server)" if line else ""

    def pause(self) -> None:  # the server pauses its worker while it writes any reply
        pass

    def resume(self) -> None:
        pass

    # life cycle ---------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """At the start of the chat: follow the server's jobs from now on."""
        self._update(self._fetch())
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._follow())
        return [f"Using the server at {self.server.url}: it answers and trains; leaving the chat stops neither."]

    async def shutdown(self) -> None:
        """Leaving the chat: the server's job goes on (its feedback is the server's now)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.refresh()
            except ShammahError as e:  # the server went away: keep the chat usable, say it on the next command
                log.warning("%s", e)
                self._state = {}

    def _fetch(self) -> dict:
        return self.server("GET", "/v1/feedback", timeout=5)["training"]

    async def refresh(self) -> None:
        self._update(await asyncio.to_thread(self._fetch))  # the HTTP off the loop; the store on it

    def _update(self, state: dict) -> None:
        """Take the server's job state; tell the end of every job seen running (its message is in
        the shared store), once."""
        self._state = state
        self._seen.update(j for j in (state.get("job"), state.get("queued")) if j)
        for job_id in sorted(self._seen):
            row = self.store.job(job_id)
            if row is not None and row["status"] not in ("queued", "running"):
                self._seen.discard(job_id)
                self.notify(row["message"])

    # actions ------------------------------------------------------------------------------
    def maybe_trigger(self) -> str | None:
        """Feedback was written: the server trains if the buffer crossed the threshold."""
        out = self.server("POST", "/v1/feedback/check")
        self._update(out["training"])
        return out.get("message")

    def start(self, trigger: str) -> str:
        try:
            job = self.server("POST", "/v1/jobs", {"source": "feedback"})
        except ShammahError as e:
            return str(e).split("answered: ", 1)[-1]  # "nothing new to learn", as the chat says it
        self._seen.add(job["id"])
        self._state = {**self._state, "pending": True}
        return f"Training {job['id']} {job['status']} on the server; keep chatting. /train status, /train cancel."

    async def cancel(self) -> str:
        await self.refresh()
        job_id = self._state.get("job") or self._state.get("queued")
        if job_id is None:
            if self.running:
                return "Training is about to start on the server; /train cancel once it runs."
            return "No training job is running."
        row = await asyncio.to_thread(self.server, "DELETE", f"/v1/jobs/{job_id}")
        self._seen.discard(job_id)  # told here, not again by the poll
        await self.refresh()
        return row["message"] or f"Cancelled {job_id}; its feedback stays in the buffer."

    async def wait(self) -> None:
        while True:
            await self.refresh()
            if not self.running:
                return
            await asyncio.sleep(POLL_S / 2)

    async def activate(self, name: str | None) -> float:
        target = name if name is not None else self.spec.name  # the base model's id = no adapter
        out = await asyncio.to_thread(self.server, "POST", f"/v1/adapters/{quote(target, safe='/')}/activate")
        return out["swap_ms"] / 1000
