"""Front ends for :class:`ChatSession`: an interactive prompt-toolkit REPL, and a line
reader for piped input. Neither imports torch: the model loads in a background
thread while the prompt is already usable.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from shammah.repl.commands import ChatSession


def banner(session: ChatSession) -> str:
    spec = session.engine.spec
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
    with patch_stdout(raw=True):
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


async def run_lines(session: ChatSession, stream: TextIO | None = None) -> None:
    """Non-interactive mode: every input line is a question or a command; exit at EOF."""
    stream = stream or sys.stdin
    session.engine.start_loading()
    session.console.notice(banner(session))
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, stream.readline)
        if not line:
            break
        if not await session.handle(line.rstrip("\n")):
            break
    if session.jobs.running:  # a script's feedback must not be lost to an early exit
        session.console.notice("Waiting for the background training job to finish…")
        await session.jobs.wait()
