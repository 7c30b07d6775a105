"""Front ends for :class:`ChatSession`: an interactive prompt-toolkit REPL, and a line
reader for piped input. Neither imports torch: the model loads in a background
thread while the prompt is already usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from typing import TextIO

from shammah.repl.commands import ChatSession


def banner(session: ChatSession) -> str:
    spec = session.engine.spec
    server = getattr(session.engine, "server", None)
    if server is not None:
        return f"Model: {spec.name}, served by shammah serve at {server.url}. Type /help for commands."
    how = "set model.base in the config or SHAMMAH_MODEL to change it"
    return f"Model: {spec.name} ({how}). Type /help for commands."


async def run_interactive(session: ChatSession, *, input=None, output=None, history_path=None) -> None:
    """The REPL: ``prompt_async`` under ``patch_stdout`` so background output lands above the prompt."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.patch_stdout import patch_stdout

    history = FileHistory(str(history_path)) if history_path else InMemoryHistory()
    completer = WordCompleter([f"/{c}" for c in session.commands()], sentence=True)
    prompt = PromptSession(
        history=history,
        completer=completer,
        complete_while_typing=False,
        input=input,
        output=output,
        # the job status lives in the toolbar, so it never interleaves with a reply or the prompt
        bottom_toolbar=lambda: session.jobs.status_line() or None,
        refresh_interval=0.5,
    )
    session.engine.start_loading()
    session.console.info(banner(session))
    session.start()
    with patch_stdout(raw=True), _sigterm_ends(session):
        while True:
            try:
                line = await prompt.prompt_async("› ")
            except KeyboardInterrupt:  # Ctrl+C at the prompt clears the line
                continue
            except EOFError:  # Ctrl+D
                break
            if not await session.handle(line):
                break
    await session.jobs.shutdown()


@contextlib.contextmanager
def _sigterm_ends(session: ChatSession):
    """SIGTERM (a service manager, `kill`, a closing terminal emulator) ends the chat like /exit:
    the caller's shutdown stops the training worker (no orphan) and records the job cancelled.
    Everything acknowledged is already on disk."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    state = {"hit": False}

    def on_term() -> None:
        state["hit"] = True
        session.interrupt()  # a reply being written stops at the next token
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_term)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / not Unix
        installed = False
    try:
        yield state
    except asyncio.CancelledError:
        if not state["hit"]:
            raise
        task.uncancel()
        session.console.notice("Terminated: stopping.")
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


async def run_lines(session: ChatSession, stream: TextIO | None = None) -> None:
    """Non-interactive mode: every input line is a question or a command; exit at EOF."""
    stream = stream or sys.stdin
    session.engine.start_loading()
    session.console.notice(banner(session))
    session.start()
    lines = _reader(stream)
    with _sigterm_ends(session):
        while True:
            line = await lines.get()
            if line is None or not await session.handle(line.rstrip("\n")):
                break
        if session.jobs.running:  # a script's feedback must not be lost to an early exit
            session.console.notice("Waiting for the background training job to finish…")
            await session.jobs.wait()
    # after SIGTERM: stops the job instead of waiting for it; always: ends a spare worker
    await session.jobs.shutdown()


def _reader(stream: TextIO) -> asyncio.Queue:
    """Lines of ``stream`` on a queue, read by a daemon thread: a blocked read of an open stdin
    must not keep the process alive after SIGTERM (the default executor would be joined)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def read() -> None:
        try:
            for line in iter(stream.readline, ""):
                loop.call_soon_threadsafe(q.put_nowait, line)
        except (OSError, ValueError, RuntimeError):  # closed stream or loop
            pass
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(q.put_nowait, None)

    threading.Thread(target=read, name="shammah-stdin", daemon=True).start()
    return q
