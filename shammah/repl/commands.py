"""The chat session: conversation state, the slash commands, and asking the model.

Each command is a ``cmd_<name>`` method whose docstring's first line is its
/help entry, so adding a command is adding one method. The session is driven
line by line (:meth:`ChatSession.handle`) by either front end in ``app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import threading

from shammah.config import Config
from shammah.engine import Engine
from shammah.errors import FeedbackError, ShammahError
from shammah.feedback.store import Feedback, Store
from shammah.repl.io import Console

log = logging.getLogger(__name__)


def _clip(text: str | None, n: int = 48) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


class ChatSession:
    def __init__(self, cfg: Config, engine: Engine, store: Store, console: Console):
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.console = console
        self.system_prompt: str | None = cfg.chat.system_prompt or None
        self.conversation_id: int | None = None
        self.history: list[dict] = []  # user/assistant messages of this conversation
        self.last_turn_id: int | None = None
        self._stop: threading.Event | None = None

    # dispatch ----------------------------------------------------------------
    @classmethod
    def commands(cls) -> dict[str, str]:
        """name -> one-line help, from the cmd_<name> docstrings."""
        out = {}
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("cmd_"):
                out[name[4:]] = inspect.getdoc(fn).splitlines()[0]
        return out

    async def handle(self, line: str) -> bool:
        """Process one line of input; False means the user asked to leave."""
        line = line.strip()
        if not line:
            return True
        try:
            if line.startswith("/"):
                name, _, arg = line[1:].partition(" ")
                fn = getattr(self, f"cmd_{name.lower()}", None)
                if fn is None:
                    self.console.error(f"unknown command /{name}; type /help for the list")
                    return True
                result = fn(arg.strip())
                if inspect.isawaitable(result):
                    result = await result
                return result is not False
            await self.ask(line)
        except ShammahError as e:
            self.console.error(str(e))
        except Exception as e:  # a bug or a backend failure must not end the chat
            log.exception("command failed: %s", line)
            self.console.error(f"{type(e).__name__}: {e} (details in the log)")
        return True

    # asking ------------------------------------------------------------------
    def messages_for(self, prompt: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + self.history + [{"role": "user", "content": prompt}]

    def interrupt(self) -> None:
        """Stop the reply being generated (Ctrl+C); the chat goes on."""
        if self._stop is not None:
            self._stop.set()

    @contextlib.contextmanager
    def _sigint_stops_reply(self):
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self.interrupt)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / not Unix
            installed = False
        try:
            yield
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGINT)

    async def ensure_loaded(self) -> None:
        if not self.engine.ready:
            self.engine.start_loading()
            await self.console.spin_until(f"Loading {self.engine.spec.name}", lambda: self.engine.ready)
        self.engine.load()  # raises the load error, if any

    async def ask(self, prompt: str) -> None:
        self._stop = stop = threading.Event()
        with self._sigint_stops_reply():
            await self.ensure_loaded()
            if stop.is_set():
                self.console.info("(cancelled)")
                return
            await self._answer(prompt, stop)

    async def _answer(self, prompt: str, stop: threading.Event) -> None:
        messages = self.messages_for(prompt)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        adapter = self.engine.adapter

        def produce() -> None:  # runs in a worker thread; the event loop stays free
            try:
                for chunk in self.engine.stream(messages, stop=stop):
                    loop.call_soon_threadsafe(q.put_nowait, chunk)
            except BaseException as e:
                loop.call_soon_threadsafe(q.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(q.put_nowait, None)

        worker = loop.run_in_executor(None, produce)
        pieces: list[str] = []
        last = None
        try:
            while (item := await q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                pieces.append(item.text)
                self.console.stream(item.text)
                last = item
        except asyncio.CancelledError:
            stop.set()
            raise
        finally:
            await asyncio.shield(worker)
        reply = "".join(pieces).strip()
        reason = last.finish_reason if last else "error"
        self.console.end_stream("[interrupted]" if reason == "interrupted" else "")
        if self.conversation_id is None:
            self.conversation_id = self.store.new_conversation(self.engine.spec.name, self.system_prompt)
        self.last_turn_id = self.store.add_turn(
            self.conversation_id,
            messages,
            prompt,
            reply,
            model=self.engine.spec.name,
            adapter=adapter,
            finish_reason=reason,
            new_tokens=last.new_tokens if last else 0,
            seconds=last.seconds if last else 0.0,
        )
        self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]

    # commands ----------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        """Show the commands."""
        rows = [(f"/{name}", doc) for name, doc in self.commands().items()]
        self.console.table(rows)
        self.console.info("Anything else is sent to the model. Ctrl+C stops a reply; Ctrl+D or /exit leaves.")

    def cmd_exit(self, arg: str) -> bool:
        """Leave the chat."""
        return False

    def cmd_quit(self, arg: str) -> bool:
        """Leave the chat (same as /exit)."""
        return False

    def cmd_clear(self, arg: str) -> None:
        """Start a new conversation (the model forgets this one; ratings are kept)."""
        self.conversation_id = None
        self.history = []
        self.last_turn_id = None
        self.console.info("New conversation.")

    def cmd_system(self, arg: str) -> None:
        """/system <text>: set the system prompt (no text: show it; '-' to reset)."""
        if not arg:
            self.console.info(f"System prompt: {self.system_prompt or '(the model default)'}")
            return
        self.system_prompt = None if arg == "-" else arg
        self.console.info("System prompt reset." if arg == "-" else "System prompt set.")

    def cmd_status(self, arg: str) -> None:
        """Show the model, device, active adapter and the training buffer."""
        info = self.engine.info()
        rows = [(k, v) for k, v in info.items()]
        rows.append(("conversation", f"{len(self.history) // 2} turns"))
        rows.append(("feedback", str(self.store.buffer())))
        rows.append(("database", str(self.store.path)))
        self.console.table(rows)

    def _rated_turn(self) -> int:
        if self.last_turn_id is None:
            raise FeedbackError("nothing to rate yet: ask something first")
        return self.last_turn_id

    def _ack(self, item: Feedback, verb: str) -> None:
        self.console.ok(f"{verb} #{item.id} for the last reply (weight {item.weight:g}). {self.store.buffer()}")

    def cmd_good(self, arg: str) -> None:
        """/good [note]: rate the last reply as good (it becomes a training target)."""
        self._ack(self.store.rate(self._rated_turn(), "good", arg or None), "Saved /good")

    def cmd_medium(self, arg: str) -> None:
        """/medium <note>: the last reply was somewhat wrong; say what to change."""
        self._ack(self.store.rate(self._rated_turn(), "medium", arg), "Saved /medium")

    def cmd_critical(self, arg: str) -> None:
        """/critical <note>: the last reply was badly wrong; say what to change."""
        self._ack(self.store.rate(self._rated_turn(), "critical", arg), "Saved /critical")

    def cmd_fix(self, arg: str) -> None:
        """/fix <better answer>: give the answer the last reply should have been."""
        self._ack(self.store.fix(self._rated_turn(), arg), "Saved /fix")

    def cmd_feedback(self, arg: str) -> None:
        """/feedback list | undo | drop <id>: review or remove ratings."""
        sub, _, rest = arg.partition(" ")
        sub = sub or "list"
        if sub == "list":
            items = self.store.list_feedback()
            if not items:
                self.console.info("No feedback yet. Rate a reply with /good, /medium, /critical or /fix.")
                return
            rows = [
                (str(f.id), f.rating, f"{f.weight:g}", _clip(f.prompt, 32), _clip(f.fix or f.note, 40)) for f in items
            ]
            self.console.table(rows, header=("id", "rating", "weight", "prompt", "note / fix"))
            self.console.info(str(self.store.buffer()))
        elif sub == "undo":
            item = self.store.undo()
            self.console.ok(f"Removed /{item.rating} #{item.id}. {self.store.buffer()}")
        elif sub == "drop":
            if not rest.strip().isdigit():
                raise FeedbackError("usage: /feedback drop <id> (ids are in /feedback list)")
            item = self.store.drop(int(rest))
            self.console.ok(f"Removed /{item.rating} #{item.id}. {self.store.buffer()}")
        else:
            raise FeedbackError(f"unknown /feedback {sub!r}: use list, undo or drop <id>")
