"""The chat driven through a real prompt-toolkit PromptSession fed by a pipe."""

import asyncio
import io
import os
import re
import signal

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from shammah.config import Config, ModelConfig
from shammah.engine import Engine
from shammah.feedback.store import Store
from shammah.repl import app
from shammah.repl.commands import ChatSession
from shammah.repl.io import Console


@pytest.fixture
def make_session(tiny_qwen2, shammah_home):
    made = []

    def make(**model_kw) -> tuple[ChatSession, io.StringIO]:
        kw = dict(base=str(tiny_qwen2), temperature=0.0, max_new_tokens=8) | model_kw
        cfg = Config(model=ModelConfig(**kw))
        out = io.StringIO()
        console = Console(out=out, err=out, color=False)
        s = ChatSession(cfg, Engine(cfg.model, shammah_home / "cache"), Store(shammah_home / "db.sqlite"), console)
        made.append(s)
        return s, out

    yield make
    for s in made:
        s.engine.wait()  # no load thread outlives its test
        s.store.close()


def drive(session, keys: str, history_path=None) -> None:
    with create_pipe_input() as inp:
        inp.send_text(keys)
        asyncio.run(app.run_interactive(session, input=inp, output=DummyOutput(), history_path=history_path))


def test_chat_rate_and_list_through_a_prompt_session(make_session, shammah_home):
    s, out = make_session()
    drive(s, "hello\r/good nice\r/critical\r/feedback list\r/exit\r")
    text = out.getvalue()
    assert "Saved /good #1 for the last reply (weight 1). Training buffer: 1 example (1 weighted)" in text
    assert "error: /critical needs a note" in text
    assert "id  rating  weight  prompt  note / fix" in text
    turn = s.store.turn(s.last_turn_id)
    assert turn.prompt == "hello" and turn.model == s.engine.spec.name and turn.adapter is None
    assert turn.reply == s.engine.reply([{"role": "user", "content": "hello"}]).strip()
    assert [f.note for f in s.store.list_feedback()] == ["nice"]


def test_multi_turn_context_and_clear(make_session):
    s, out = make_session()
    drive(s, "first\rsecond\r/clear\rthird\r/exit\r")
    turns = s.store.turns(1)
    assert [t.prompt for t in turns] == ["first", "second"]
    assert [m["content"] for m in turns[1].messages if m["role"] == "user"] == ["first", "second"]
    assert turns[1].messages[1] == {"role": "assistant", "content": turns[0].reply}
    third = s.store.turn(s.last_turn_id)
    assert third.conversation_id != 1 and third.messages == [{"role": "user", "content": "third"}]


def test_system_prompt_reaches_the_model(make_session):
    s, out = make_session()
    drive(s, "/system Answer in French.\rhi\r/system\r\x04")
    assert s.store.turn(s.last_turn_id).messages[0] == {"role": "system", "content": "Answer in French."}
    assert "System prompt: Answer in French." in out.getvalue()


def test_help_lists_every_command_from_docstrings(make_session):
    s, out = make_session()
    drive(s, "/help\r/nosuch\r/exit\r")
    text = out.getvalue()
    # the commands the README and `shammah --help` promise, each with its one-line description
    promised = "good medium critical fix accept edit reject feedback train adapters status system clear help exit"
    assert set(promised.split()) <= set(ChatSession.commands())
    for name in promised.split():
        assert re.search(rf"^\s*/{name}\b.*\S", text, re.M), name
    assert "error: unknown command /nosuch; type /help for the list" in text


def test_ctrl_c_at_prompt_keeps_the_chat_and_ctrl_d_leaves(make_session):
    s, out = make_session()
    drive(s, "half typed\x03/status\r\x04")
    text = out.getvalue()
    assert "Training buffer: 0 examples (0 weighted)" in text
    assert s.last_turn_id is None, "the Ctrl+C'd line was not sent"


def test_rating_before_any_reply_is_a_clear_error(make_session):
    s, out = make_session()
    drive(s, "/good\r/fix better\r/exit\r")
    assert out.getvalue().count("error: nothing to rate yet: ask something first") == 2


def test_history_persists_across_sessions(make_session, shammah_home):
    hist = shammah_home / "history"
    s, _ = make_session()
    drive(s, "/status\r\x04", history_path=hist)
    assert "/status" in hist.read_text()
    s2, out2 = make_session()
    drive(s2, "\x1b[A\r/exit\r", history_path=hist)  # Up-arrow recalls the previous session's input
    assert "Training buffer" in out2.getvalue()


def test_sigint_while_streaming_stops_the_reply_not_the_chat(make_session):
    s, out = make_session(max_new_tokens=2000)

    async def scenario():
        s.engine.load()
        task = asyncio.create_task(s.handle("tell me a long story"))
        while "\n" not in out.getvalue() and len(out.getvalue()) < 5:
            await asyncio.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl+C sends while a reply streams
        assert await task is True
        await s.handle("/status")

    asyncio.run(scenario())
    turn = s.store.turn(s.last_turn_id)
    assert turn.finish_reason == "interrupted"
    assert "[interrupted]" in out.getvalue() and "conversation  1 turns" in out.getvalue()


def test_model_load_error_is_reported_and_chat_continues(shammah_home):
    cfg = Config(model=ModelConfig(base="Qwen/Qwen2.5-0.5B-Instruct"))
    out = io.StringIO()
    s = ChatSession(
        cfg,
        Engine(cfg.model, shammah_home / "cache"),
        Store(shammah_home / "db"),
        Console(out=out, err=out, color=False),
    )
    drive(s, "hello\r/status\r/exit\r")
    text = out.getvalue()
    assert "error: model 'Qwen/Qwen2.5-0.5B-Instruct' is not in the local Hugging Face cache" in text
    assert 'model.base = "embedded"' in text and "feedback" in text
    s.store.close()
