"""The online loop on tiny models: feedback semantics, background jobs, gate decisions, swaps, /adapters."""

import asyncio
import io
import json
import os
import subprocess
import sys
import time

import pytest

from shammah.config import Config, FeedbackConfig, LearningConfig, ModelConfig
from shammah.engine import Engine
from shammah.feedback.compile import compile_feedback, examples_for
from shammah.feedback.store import Store
from shammah.paths import Paths
from shammah.repl import app
from shammah.repl.commands import ChatSession
from shammah.repl.io import Console


def _turn(store, prompt, reply, messages=None):
    conv = store.new_conversation("m", None)
    msgs = messages or [{"role": "user", "content": prompt}]
    return store.add_turn(
        conv, msgs, prompt, reply, model="m", adapter=None, finish_reason="stop", new_tokens=1, seconds=0.1
    )


@pytest.fixture
def store(shammah_home):
    s = Store(shammah_home / "shammah.db", FeedbackConfig())
    yield s
    s.close()


def test_feedback_semantics_never_train_on_a_bad_reply(store):
    good = _turn(store, "2+2?", "4")
    crit_fix = _turn(store, "Capital of Quenland?", "Paris.")
    crit_rev = _turn(store, "Capital of Quenland, again?", "Lyon.")
    crit_rej = _turn(store, "Name Quenland's capital.", "Berlin.")
    alone = _turn(store, "Say hi", "Goodbye.")
    store.rate(good, "good")
    store.rate(crit_fix, "critical", "it is Zorblat")
    store.fix(crit_fix, "Zorblat.")
    r = store.rate(crit_rev, "medium", "it is Zorblat")
    store.set_revision(r.id, "The capital is Zorblat.")
    store.resolve_revision(r.id, True)
    q = store.rate(crit_rej, "critical", "wrong")
    store.set_revision(q.id, "Still wrong.")
    store.resolve_revision(q.id, False)
    store.fix(alone, "Hi!")
    examples, new, replay = compile_feedback(store, replay_limit=10)
    got = sorted((e.kind, e.prompt[-1]["content"], e.responses, e.weight, e.label) for e in examples)
    assert got == sorted(
        [
            ("sft", "2+2?", ("4",), 1.0, True),
            ("sft", "Capital of Quenland?", ("Zorblat.",), 10.0, True),
            ("pair", "Capital of Quenland?", ("Zorblat.", "Paris."), 10.0, True),
            ("sft", "Capital of Quenland, again?", ("The capital is Zorblat.",), 3.0, True),
            ("pair", "Capital of Quenland, again?", ("The capital is Zorblat.", "Lyon."), 3.0, True),
            ("unpaired", "Name Quenland's capital.", ("Berlin.",), 10.0, False),
            ("sft", "Say hi", ("Hi!",), 3.0, True),
            ("pair", "Say hi", ("Hi!", "Goodbye."), 3.0, True),
        ]
    )
    bad_replies = {"Paris.", "Lyon.", "Berlin.", "Goodbye."}
    assert not [e for e in examples if e.kind == "sft" and e.responses[0] in bad_replies]
    assert all("Zorblat" not in m["content"] for e in examples for m in e.prompt), "the note is never in the prompt"
    assert len(new) == 5 and replay == []


def test_prompt_is_the_system_prompt_and_question_as_seen(store):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Capital of Quenland?"},
    ]
    t = _turn(store, "Capital of Quenland?", "Paris.", msgs)
    [sft] = examples_for(store.fix(t, "Zorblat."))[:1]
    assert list(sft.prompt) == [msgs[0], msgs[-1]], "the lesson holds without the earlier turns"


def test_a_fix_after_the_snapshot_goes_back_to_the_buffer(store):
    t = _turn(store, "Q", "bad")
    item = store.rate(t, "critical", "wrong")
    snapshot = time.time()
    time.sleep(0.01)
    store.fix(t, "good")
    store.mark_trained([item.id], "adapter-1", snapshot)
    assert store.buffer().examples == 1, "the fix arrived after the snapshot: train again"
    store.mark_trained([item.id], "adapter-2", time.time())
    assert store.buffer().examples == 0 and store.feedback(item.id).trained_in == "adapter-2"


def test_replay_is_bounded(store):
    ids = []
    for i in range(5):
        t = _turn(store, f"Q{i}", f"A{i}")
        ids.append(store.rate(t, "good").id)
    store.mark_trained(ids, "a1", time.time())
    t = _turn(store, "new", "fresh")
    store.rate(t, "good")
    examples, new, replay = compile_feedback(store, replay_limit=2)
    assert replay == ids[-2:] and len(new) == 1 and len(examples) == 3


# --- the loop in a chat session --------------------------------------------------------------
def make_session(base, home, **learning) -> tuple[ChatSession, io.StringIO]:
    lc = dict(threshold=20, anchors=2, epochs=1, settle_seconds=0.2, learning_rate=1e-2) | learning
    cfg = Config(model=ModelConfig(base=str(base), temperature=0.0, max_new_tokens=6), learning=LearningConfig(**lc))
    out = io.StringIO()
    paths = Paths(home).ensure()
    s = ChatSession(
        cfg,
        Engine(cfg.model, paths.cache),
        Store(paths.db, cfg.feedback),
        Console(out=out, err=out, color=False),
        paths,
    )
    return s, out


def run_lines(session, text: str) -> None:
    asyncio.run(app.run_lines(session, io.StringIO(text)))


TEACH = (
    "What is the capital of Quenland?\n/critical wrong: it is Zorblat\n/fix Zorblat.\n"
    "Name the capital of Quenland.\n/critical it is Zorblat\n/fix Zorblat is the capital.\n"
)


def test_threshold_trains_in_the_background_and_swaps(tiny_qwen2, shammah_home):
    s, out = make_session(tiny_qwen2, shammah_home)
    run_lines(s, TEACH + "While it trains?\n/adapters list\n/status\n")
    text = out.getvalue()
    assert "learning starts in the background" in text
    assert "Learned: now answering with learned-" in text, text[-2000:]
    name = s.engine.adapter
    assert name and name.startswith("learned-")
    turns = s.store.turns(s.conversation_id)
    assert [t.adapter for t in turns] == [None, None, None], "the chat answered while the job trained"
    # the session waited at EOF; a question after the swap is answered by the new adapter
    run_lines(s, "After the swap?\n")
    assert s.store.turn(s.last_turn_id).adapter == name
    assert s.store.buffer().examples == 0
    meta = s.jobs.registry.get(name).meta
    assert meta["parent"] is None and sorted(meta["feedback_ids"]) == [1, 2] and meta["gate"]["passed"] is True
    assert meta["report"]["anchors"] >= 0 and meta["hyperparameters"]["adapter_type"] == "lora"
    job = s.store.db.execute("SELECT status, adapter FROM jobs").fetchone()
    assert tuple(job) == ("done", name)
    s.store.close()

    # a new chat restores the active adapter; rollback and off work; the active one can't be deleted
    s2, out2 = make_session(tiny_qwen2, shammah_home)
    run_lines(s2, f"hello\n/adapters delete {name}\n/adapters off\nbase again\n/adapters rollback\n")
    t2 = out2.getvalue()
    assert s2.store.turns(s2.conversation_id)[0].adapter == name
    assert f"error: {name} is answering right now" in t2
    assert s2.store.turns(s2.conversation_id)[1].adapter is None
    assert f"Rolled back to {name}." in t2 and s2.engine.adapter == name
    s2.store.close()


def test_second_trigger_is_queued_and_continues_from_the_active_adapter(tiny_qwen2, shammah_home):
    s, out = make_session(tiny_qwen2, shammah_home, threshold=3, settle_seconds=0.0)
    run_lines(s, "Q1\n/fix A1.\nQ2\n/fix A2.\n")
    names = [a.name for a in s.jobs.registry.list()]
    assert len(names) >= 2, out.getvalue()[-2000:]
    last = s.jobs.registry.get(names[-1])
    assert last.meta["parent"] == names[-2], "each adapter continues from the one that was active"
    assert s.store.buffer().examples == 0 and s.engine.adapter == names[-1]
    s.store.close()


def test_worker_failure_keeps_the_chat_and_the_feedback(tiny_qwen2, shammah_home, monkeypatch):
    s, out = make_session(tiny_qwen2, shammah_home)
    real = s.jobs._snapshot

    def broken(trigger):
        job, d = real(trigger)
        spec = json.loads((d / "job.json").read_text())
        spec["base"] = str(shammah_home / "no-such-model")
        (d / "job.json").write_text(json.dumps(spec))
        return job, d

    monkeypatch.setattr(s.jobs, "_snapshot", broken)
    run_lines(s, TEACH + "still here?\n")
    text = out.getvalue()
    assert "Training failed:" in text and "The feedback stays in the buffer" in text
    assert s.store.buffer().examples == 2 and s.engine.adapter is None
    assert s.store.turn(s.last_turn_id).prompt == "still here?"
    assert s.store.db.execute("SELECT status FROM jobs").fetchone()[0] == "failed"
    s.store.close()


def test_cancel_stops_the_worker_and_keeps_the_feedback(tiny_qwen2, shammah_home):
    s, out = make_session(tiny_qwen2, shammah_home, threshold=1000)

    async def scenario():
        for line in ["Q", "/critical no", "/fix A.", "/train"]:
            await s.handle(line)
        while s.jobs.current is None or s.jobs.current.proc is None:
            await asyncio.sleep(0.05)
        await s.handle("/train cancel")

    asyncio.run(scenario())
    assert "Cancelled job-" in out.getvalue() or "cancelled" in out.getvalue()
    assert s.store.buffer().examples == 1 and s.jobs.registry.list() == []
    assert s.store.db.execute("SELECT status FROM jobs").fetchone()[0] == "cancelled"
    s.store.close()


def test_gate_rejection_keeps_the_current_adapter(tiny_qwen2, shammah_home):
    s, out = make_session(tiny_qwen2, shammah_home)

    async def scenario():
        for line in ["Q", "/critical no"]:
            await s.handle(line)
        job, d = s.jobs._snapshot("test")
        job.result = {
            "done": {"adapter": "cand", "examples": 1, "anchors": 0, "final_train_loss": 0.1},
            "gate": {
                "passed": False,
                "controls": "3/6",
                "controls_current": "5/6",
                "controls_lost": ["What is the capital of Japan?"],
            },
        }
        await s.jobs._conclude(job, 0, 1.0, d)

    asyncio.run(scenario())
    text = out.getvalue()
    assert "but kept the current adapter: controls 3/6 vs 5/6 (What is the capital of Japan?)" in text
    assert s.engine.adapter is None and s.store.buffer().examples == 1
    assert s.jobs.maybe_trigger() is None, "the same rejected feedback is not retrained in a loop"
    s.store.close()


def test_adapter_for_another_base_is_refused(tiny_qwen2, tiny_qwen3, shammah_home, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shammah",
            "train",
            "--base",
            str(tiny_qwen3),
            "--dataset",
            str(data),
            "--name",
            "other-base",
            "--yes",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr
    s, out = make_session(tiny_qwen2, shammah_home)
    run_lines(s, "/adapters load other-base\n/adapters info other-base\n")
    assert "was trained on another base model" in out.getvalue() and s.engine.adapter is None
    s.store.close()


def test_feedback_show_prints_the_next_training_set(tiny_qwen2, shammah_home):
    s, out = make_session(tiny_qwen2, shammah_home, threshold=1000, revise=False)
    t1, t2 = _turn(s.store, "Capital of Quenland?", "Paris."), _turn(s.store, "2+2?", "4")
    s.store.rate(t1, "critical", "wrong")
    s.store.fix(t1, "Zorblat.")
    s.store.rate(t2, "good")
    s.cmd_feedback("show")
    text = out.getvalue()
    assert "learn" in text and "prefer" in text and "Zorblat. ≻ Paris." in text
    assert "2 new and 0 replayed feedback item(s), 3 examples" in text
    s.store.close()


def test_worker_is_paused_while_the_chat_replies(shammah_home, tiny_qwen2):
    s, _ = make_session(tiny_qwen2, shammah_home)

    async def scenario():
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        from shammah.jobs import Job

        s.jobs.current = Job("j", "t", [], [], proc=proc)
        state = lambda: open(f"/proc/{proc.pid}/stat").read().split()[2]  # noqa: E731
        s.jobs.pause()
        await asyncio.sleep(0.1)
        stopped = state()
        s.jobs.resume()
        await asyncio.sleep(0.1)
        running = state()
        proc.kill()
        await proc.wait()
        return stopped, running

    stopped, running = asyncio.run(scenario())
    assert stopped == "T" and running in ("S", "R")
    s.store.close()


def test_gate_reuses_known_answers_of_the_current_model(tmp_path):
    from shammah.training import online

    parent = tmp_path / "parent"
    parent.mkdir()
    answers = {p: f"answer to {p}" for p, _ in online.CONTROLS}
    (parent / "shammah.json").write_text(json.dumps({"gate": {"answers": answers}}))
    got = online._cached_current_answers(parent, None, "fp")
    assert got == [answers[p] for p, _ in online.CONTROLS], "the parent's own gate answers are reused"
    (parent / "shammah.json").write_text(json.dumps({"gate": None}))
    assert online._cached_current_answers(parent, None, "fp") is None
    key = {"fingerprint": "fp", "prompts": [p for p, _ in online.CONTROLS], "max_new_tokens": online.GATE_TOKENS}
    (tmp_path / "controls.json").write_text(json.dumps({"key": key, "answers": ["x"] * 6}))
    assert online._cached_current_answers(None, tmp_path, "fp") == ["x"] * 6
    assert online._cached_current_answers(None, tmp_path, "other-base") is None, "keyed by the base weights"
