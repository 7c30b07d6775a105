"""The chat session: conversation state, the slash commands, and asking the model.

Each command is a ``cmd_<name>`` method whose docstring's first line is its
/help entry, so adding a command is adding one method. The session is driven
line by line (:meth:`ChatSession.handle`) by either front end in ``app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import signal
import threading

from shammah.adapters.choice import describe_recorded
from shammah.adapters.registry import AdapterError, table
from shammah.adapters.rule import Rule
from shammah.adapters.scope import describe_summary
from shammah.config import Config
from shammah.engine import Engine
from shammah.errors import FeedbackError, ShammahError
from shammah.feedback import compile as fbc
from shammah.feedback.revise import revision_messages, trust_unseen
from shammah.feedback.store import Feedback, Store
from shammah.jobs import JobManager
from shammah.paths import Paths
from shammah.repl.io import Console

log = logging.getLogger(__name__)


def _clip(text: str | None, n: int = 48) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _rule_text(a) -> str:
    """An adapter's style rule in words (``a``: its registry entry), or the one turned off."""
    rule, dropped = Rule.recorded(a.get("rule")), Rule.recorded(a.get("rule_dropped"))
    if rule is not None:
        return rule.on_replies()
    return f"none ({dropped.describe()} was turned off)" if dropped is not None else "none"


class ChatSession:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        store: Store,
        console: Console,
        paths: Paths | None = None,
        jobs: JobManager | None = None,
    ):
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.console = console
        self.paths = paths or Paths(store.path.parent)
        self.jobs = jobs or JobManager(cfg, self.paths, store, engine)
        self.jobs.notify = self.notify  # job news goes through the session: held back while a reply streams
        self.busy = False  # a reply is streaming: job messages wait until it ends
        self._deferred: list[str] = []
        self._restored = hasattr(engine, "server")  # a server (serve.remote) restored its active adapter itself
        self.failures = 0  # lines that failed: a script's exit status says so at the end
        self.system_prompt: str | None = cfg.chat.system_prompt or None
        self.conversation_id: int | None = None
        self.history: list[dict] = []  # user/assistant messages of this conversation
        self.last_turn_id: int | None = None
        self._stop: threading.Event | None = None
        self._teacher = None  # learning.rewriter = "teacher": its endpoint, resolved at the first rewrite

    # dispatch ----------------------------------------------------------------
    @classmethod
    def commands(cls) -> dict[str, str]:
        """name -> one-line help, from the cmd_<name> docstrings."""
        out = {}
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("cmd_"):
                out[name[4:]] = inspect.getdoc(fn).splitlines()[0]
        return out

    async def use_adapter(self, name: str | None) -> None:
        """Answer with ``name`` (None = the base) in this session only: the saved active adapter
        is neither restored nor changed (``shammah ask --adapter``)."""
        await self.ensure_loaded_without_restore()
        path = fp = None
        if name is not None:
            info = self.jobs.registry.get(name)
            path, fp = info.path, info.get("base", "fingerprint")
        self.engine.activate(name, path, fp)

    async def ensure_loaded_without_restore(self) -> None:
        self._restored = True
        await self.ensure_loaded()

    def start(self) -> None:
        """At the start of a chat: recover from a chat that died mid-job, and train a buffer that
        is already over the threshold (it would otherwise wait for the next rating)."""
        for note in self.jobs.recover():
            self.console.notice(note)
        msg = self.jobs.maybe_trigger()
        if msg:
            self.notify(msg)

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
                    self.failures += 1
                    self.console.error(f"unknown command /{name}; type /help for the list")
                    return True
                result = fn(arg.strip())
                if inspect.isawaitable(result):
                    result = await result
                return result is not False
            await self.ask(line)
        except ShammahError as e:
            self.failures += 1
            self.console.error(str(e))
        except Exception as e:  # a bug or a backend failure must not end the chat
            self.failures += 1
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
        if not self._restored:
            self._restored = True
            name = self.jobs.active.name
            if name:
                try:
                    await self.jobs.activate(name)
                except ShammahError as e:
                    self.console.error(f"could not restore adapter {name}: {e}; using the base model")
                    self.jobs.active.forget()

    # messages from background jobs -------------------------------------------------------
    def notify(self, message: str) -> None:
        """Job news: printed at once at the prompt, held back while a reply streams."""
        if self.busy:
            self._deferred.append(message)
        else:
            self.console.ok(message)

    def _flush_deferred(self) -> None:
        while self._deferred:
            self.console.ok(self._deferred.pop(0))

    async def ask(self, prompt: str) -> None:
        self._stop = stop = threading.Event()
        with self._sigint_stops_reply():
            await self.ensure_loaded()
            if stop.is_set():
                self.console.info("(cancelled)")
                return
            await self._answer(prompt, stop)

    async def _stream(self, messages: list[dict], stop: threading.Event, params=None):
        """Stream a reply to the terminal; returns (text, last chunk, the engine's info: the adapter
        that answered, and the turn when a server recorded it)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        info: dict = {}

        def produce() -> None:  # runs in a worker thread; the event loop stays free
            try:
                for chunk in self.engine.stream(messages, params, stop=stop, info=info):
                    loop.call_soon_threadsafe(q.put_nowait, chunk)
            except BaseException as e:
                loop.call_soon_threadsafe(q.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(q.put_nowait, None)

        self.busy = True
        self.jobs.pause()
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
            self.jobs.resume()
            self.busy = False
        reason = last.finish_reason if last else "error"
        self.console.end_stream("[interrupted]" if reason == "interrupted" else "")
        self._flush_deferred()
        return "".join(pieces).strip(), last, info

    async def _answer(self, prompt: str, stop: threading.Event) -> None:
        messages = self.messages_for(prompt)
        reply, last, info = await self._stream(messages, stop)
        turn_id = info.get("turn_id")  # a server answered and recorded the turn (serve.remote)
        if turn_id is None:
            if self.conversation_id is None:
                self.conversation_id = self.store.new_conversation(self.engine.spec.name, self.system_prompt)
            turn_id = self.store.add_turn(
                self.conversation_id,
                messages,
                prompt,
                reply,
                model=self.engine.spec.name,
                adapter=info.get("adapter"),
                finish_reason=last.finish_reason if last else "error",
                new_tokens=last.new_tokens if last else 0,
                seconds=last.seconds if last else 0.0,
            )
        self.last_turn_id = turn_id
        self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]

    async def _revise(self, item: Feedback) -> None:
        """Rewrite the rated answer following the note; the user accepts, edits or rejects it."""
        turn = self.store.turn(item.turn_id)
        messages = revision_messages(turn.messages, turn.reply, item.note or "")
        if self.cfg.learning.rewriter == "teacher":
            text = await self._teacher_rewrite(messages)
        else:
            self._stop = stop = threading.Event()
            self.console.info("Revision following your note:")
            with self._sigint_stops_reply():
                await self.ensure_loaded()
                text, _, _ = await self._stream(messages, stop, self.engine.gen_params(temperature=0.0))
        if not text:
            self.console.info("(no revision produced; /fix <better answer> gives one)")
            return
        self.store.set_revision(item.id, text)
        if self.console.interactive:
            self.console.info("Train on this revision? /accept, /edit <better text>, or /reject.")
            return
        # Nobody sees this rewrite: a small model's rewrite can keep the fact and invent the rest.
        decision = self.cfg.learning.revision_noninteractive
        accept = trust_unseen(decision, item.note or "", turn.prompt, text)
        self.store.resolve_revision(item.id, accept, seen=False)
        verdict = "accepted" if accept else "rejected"
        self.console.info(f"(revision {verdict}: learning.revision_noninteractive = {decision!r})")

    async def _teacher_rewrite(self, messages: list[dict]) -> str:
        """The rewrite by the teacher (``learning.rewriter = "teacher"``): a model that follows a note
        the chat's own may not (the 135M embedded model does not follow "always address me as
        Captain" in its context, README). Greedy, as the chat's own rewrite; "" if it cannot answer."""
        from shammah.pipeline.teacher import Teacher, TeacherError

        try:
            if self._teacher is None:
                teacher = await asyncio.to_thread(Teacher.from_config, self.cfg.pipeline)
                # the chat waits on it: two minutes, not the pipeline's five (a batch of examples)
                self._teacher = dataclasses.replace(teacher, timeout=120)
            self.console.info(f"Revision following your note (by {self._teacher.model}):")
            text = (await asyncio.to_thread(self._teacher.chat, messages, 0.0)).strip()
        except TeacherError as e:
            self.console.error(f"{e} (learning.rewriter = 'teacher'; 'model' rewrites with the chat's own model)")
            return ""
        self.console.stream(text)
        self.console.end_stream()
        return text

    def _after_feedback(self) -> None:
        msg = self.jobs.maybe_trigger()
        if msg:
            self.console.info(msg)

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
        name = self.engine.adapter
        if name is not None and not self.jobs.registry.exists(name):
            rows = [
                (k, f"{v} (deleted from disk: still answering from memory; /adapters load another or off)")
                if k == "adapter"
                else (k, v)
                for k, v in rows
            ]
        rows.append(("conversation", f"{len(self.history) // 2} turns"))
        rows.append(("feedback", str(self.buffer())))
        rows.append(("database", str(self.store.path)))
        self.console.table(rows)

    def _rated_turn(self) -> int:
        if self.last_turn_id is None:
            raise FeedbackError("nothing to rate yet: ask something first")
        return self.last_turn_id

    def buffer(self) -> fbc.Buffer:
        return fbc.buffer(self.store)

    def _lesson(self, turn_id: int) -> fbc.Lesson:
        return fbc.decide(self.store.turn_feedback(turn_id), self.store.weights)

    def _ack(self, item: Feedback, verb: str) -> None:
        weight = self._lesson(item.turn_id).weight
        self.console.ok(f"{verb} #{item.id} for the last reply (weight {weight:g}). {self.buffer()}")

    def cmd_good(self, arg: str) -> None:
        """/good [note]: rate the last reply as good (it becomes a training target)."""
        self._ack(self.store.rate(self._rated_turn(), "good", arg or None), "Saved /good")
        self._after_feedback()

    async def _negative(self, rating: str, note: str) -> None:
        turn_id = self._rated_turn()
        item = self.store.rate(turn_id, rating, note)
        self._ack(item, f"Saved /{rating}")
        if self._lesson(turn_id).source in ("user", "edit"):
            self.console.info("(your own answer for this reply is what it learns; no rewrite needed)")
        elif self.cfg.learning.revise:
            await self._revise(item)
        self._after_feedback()

    async def cmd_medium(self, arg: str) -> None:
        """/medium <note>: the last reply was somewhat wrong; say what to change."""
        await self._negative("medium", arg)

    async def cmd_critical(self, arg: str) -> None:
        """/critical <note>: the last reply was badly wrong; say what to change."""
        await self._negative("critical", arg)

    def cmd_fix(self, arg: str) -> None:
        """/fix <better answer>: give the answer the last reply should have been."""
        self._ack(self.store.fix(self._rated_turn(), arg), "Saved /fix")
        self._after_feedback()

    def _revision(self) -> Feedback:
        item = self.store.pending_revision()
        if item is None:
            raise FeedbackError("no revision is waiting; /medium or /critical <note> asks for one")
        return item

    def cmd_accept(self, arg: str) -> None:
        """Train on the revision just shown (as the answer the model should have given)."""
        item = self.store.resolve_revision(self._revision().id, True)
        self.console.ok(f"Revision accepted for #{item.id}. {self.buffer()}")
        self._after_feedback()

    def cmd_edit(self, arg: str) -> None:
        """/edit <text>: train on your edited version of the revision instead."""
        if not arg.strip():
            raise FeedbackError("usage: /edit <the corrected answer>")
        item = self.store.resolve_revision(self._revision().id, True, arg)
        self.console.ok(f"Edited revision saved for #{item.id}. {self.buffer()}")
        self._after_feedback()

    def cmd_reject(self, arg: str) -> None:
        """Discard the revision; the rated reply stays an example of what not to say."""
        item = self.store.resolve_revision(self._revision().id, False)
        self.console.ok(f"Revision rejected for #{item.id}; the reply is kept as a negative example.")

    # sub-commands: /<group> <sub> [arg] runs _<group>_<sub>(arg) ------------------------------
    def _sub(self, group: str, arg: str, default: str):
        sub, _, rest = arg.strip().partition(" ")
        sub = (sub or default).lower()
        fn = getattr(self, f"_{group}_{sub}", None)
        if fn is None:
            subs = sorted(n[len(group) + 2 :] for n in dir(type(self)) if n.startswith(f"_{group}_"))
            raise ShammahError(f"unknown /{group} {sub!r}: use {', '.join(subs)}")
        return fn(rest.strip())

    def cmd_feedback(self, arg: str) -> None:
        """/feedback list | show | undo | drop <id>: review ratings, or see what the next run trains on."""
        self._sub("feedback", arg, "list")

    def _feedback_show(self, arg: str) -> None:
        new, replay = fbc.compile_feedback(self.store, self.cfg.learning.replay_limit)
        if not new and not replay:
            self.console.info("The next training run has nothing to train on yet.")
            return
        rows = [
            (
                str(x.turn_id),
                "replay" if x.trained else "new",
                " ".join("/" + r for r in x.ratings),
                f"{x.weight:g}",
                _clip(x.prompt[-1]["content"], 32),
                _clip(x.teaches(self.cfg.learning.note_only), 72),
            )
            for x in replay + new
        ]
        self.console.table(rows, header=("turn", "", "ratings", "weight", "prompt", "teaches"))
        n = len(fbc.examples_of(new + replay, self.cfg.learning.note_only))
        self.console.info(
            f"{len(new)} new and {len(replay)} replayed turn(s), {n} examples"
            f" (plus {self.cfg.learning.anchors} anchor prompts answered by the base model)."
        )

    def _feedback_list(self, arg: str) -> None:
        items = self.store.list_feedback()
        if not items:
            self.console.info("No feedback yet. Rate a reply with /good, /medium, /critical or /fix.")
            return
        rows = [(str(f.id), f.rating, f"{f.weight:g}", _clip(f.prompt, 32), _clip(f.fix or f.note, 40)) for f in items]
        self.console.table(rows, header=("id", "rating", "weight", "prompt", "note / fix"))
        self.console.info(str(self.buffer()))

    def _feedback_undo(self, arg: str) -> None:
        item = self.store.undo()
        self.console.ok(f"Removed /{item.rating} #{item.id}. {self.buffer()}")

    def _feedback_drop(self, arg: str) -> None:
        if not arg.isdigit():
            raise FeedbackError("usage: /feedback drop <id> (ids are in /feedback list)")
        item = self.store.drop(int(arg))
        self.console.ok(f"Removed /{item.rating} #{item.id}. {self.buffer()}")

    async def cmd_train(self, arg: str) -> None:
        """/train [status | cancel | wait]: learn from the buffer now, or manage the running job."""
        await self._sub("train", arg, "start")

    async def _train_start(self, arg: str) -> None:
        self.console.info(self.jobs.start("/train"))

    async def _train_status(self, arg: str) -> None:
        line = self.jobs.status_line()
        self.console.info(line or f"No job running. {self.buffer()} (threshold {self.cfg.learning.threshold:g}).")

    async def _train_cancel(self, arg: str) -> None:
        self.console.info(await self.jobs.cancel())

    async def _train_wait(self, arg: str) -> None:
        if not self.jobs.running:
            self.console.info("No job running.")
            return
        await self.console.spin_until("Waiting for training", lambda: not self.jobs.running)
        await self.jobs.wait()

    async def cmd_rule(self, arg: str) -> None:
        """/rule [off]: the style rule written on every reply (learned from your answers), or stop it."""
        await self._sub("rule", arg, "show")

    async def _rule_show(self, arg: str) -> None:
        await self.ensure_loaded()
        rule, name = self.engine.rule, self.engine.adapter
        if rule is not None:
            self.console.info(f"{name} {rule.on_replies()} (/rule off to stop).")
            return
        dropped = self.jobs.registry.get(name).get("rule_dropped") if name and self.jobs.registry.exists(name) else None
        was = Rule.recorded(dropped)
        self.console.info("No style rule in force" + (f" ({was.describe()} was turned off)." if was else "."))

    async def _rule_off(self, arg: str) -> None:
        """The active adapter stops writing its rule. Its metadata says the rule was dropped, so a
        later job neither brings it back (the adapter it trains inherits the drop) nor trains it into
        the weights from replayed lessons that show it (training/online.py take_rule); teaching it
        again (three answers that show it) brings it back. /adapters rollback to the adapter before
        this one, or loading another that holds it, also does."""
        await self.ensure_loaded()
        rule, name = self.engine.rule, self.engine.adapter
        if rule is None or name is None:
            self.console.info("No style rule in force.")
            return
        if self.jobs.running:
            # the running job's adapter is made from this one as it was, rule and all
            raise AdapterError("a training job is running: /train wait (or /train cancel), then /rule off")
        self.jobs.registry.update(name, rule=None, rule_dropped=rule.record())
        await self.jobs.activate(name)
        self.console.ok(f"{name} no longer {rule.on_replies()}.")

    async def cmd_adapters(self, arg: str) -> None:
        """/adapters list | load <name> | off | rollback | info <name> | delete <name>: what was learned."""
        await self._sub("adapters", arg, "list")

    @staticmethod
    def _named(sub: str, name: str) -> str:
        if not name:
            raise AdapterError(f"usage: /adapters {sub} <name> (names are in /adapters list)")
        return name

    async def _adapters_list(self, arg: str) -> None:
        items = self.jobs.registry.list()
        if not items:
            self.console.info("No adapters yet: rate replies and they will be trained (or /train).")
            return
        active = self.engine.adapter if self._restored else self.jobs.active.name
        header, rows = table(items, active)
        self.console.table(rows, header=header)
        if active is None:
            self.console.info("Active: the base model alone.")

    async def _adapters_off(self, arg: str) -> None:
        await self.ensure_loaded()
        await self.jobs.activate(None)
        self.console.ok("Adapters off: the base model answers now.")

    async def _adapters_rollback(self, arg: str) -> None:
        prev = self.jobs.active.previous
        if prev is None:
            raise AdapterError("nothing to roll back to yet")
        await self.ensure_loaded()
        await self.jobs.activate(prev or None)
        self.console.ok(f"Rolled back to {prev or 'the base model'}.")

    async def _adapters_load(self, arg: str) -> None:
        name = self._named("load", arg)
        await self.ensure_loaded()
        secs = await self.jobs.activate(name)
        self.console.ok(f"Now answering with {name} (swapped in {secs * 1000:.0f} ms).")

    async def _adapters_info(self, arg: str) -> None:
        a = self.jobs.registry.get(self._named("info", arg))
        rep, gate = a.get("report", default={}), a.get("gate") or {}
        self.console.table(
            [
                ("name", a.name),
                ("created", a.created),
                ("base", str(a.get("base", "name"))),
                ("type / method", f"{a.get('adapter_type')} / {a.get('method')}"),
                ("parent", str(a.get("parent"))),
                ("examples", str(rep.get("examples"))),
                ("final loss", str(rep.get("final_train_loss"))),
                ("gate", json.dumps({k: v for k, v in gate.items() if k != "answers"}) if gate else "-"),
                ("scope", describe_summary(a.get("scope"))),
                ("style rule", _rule_text(a)),
                ("closed sets", "; ".join(describe_recorded(a.get("choices"))) or "none"),
                *[
                    (f"eval {ds}", ", ".join(f"{k} {v:g}" for k, v in r.get("metrics", {}).items()))
                    for ds, r in (a.get("eval") or {}).items()
                ],
                ("path", str(a.path)),
            ]
        )

    async def _adapters_delete(self, arg: str) -> None:
        name = self._named("delete", arg)
        if name == self.engine.adapter:
            raise AdapterError(f"{name} is answering right now: /adapters off or load another one first")
        self.jobs.registry.delete(name)
        self.console.ok(f"Deleted adapter {name}.")
