"""The online loop on tiny models: feedback semantics, background jobs, gate decisions, swaps, /adapters."""

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import gate_on_tiny_controls, register_adapter, scramble_lora

from shammah.config import Config, FeedbackConfig, LearningConfig, ModelConfig
from shammah.engine import Engine
from shammah.feedback.compile import buffer, compile_feedback, examples_of
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


def test_a_fix_after_the_snapshot_goes_back_to_the_buffer(store):
    t = _turn(store, "Q", "bad")
    item = store.rate(t, "critical", "wrong")
    snapshot = time.time()
    time.sleep(0.01)
    fix = store.fix(t, "good")
    store.mark_trained([item.id], "adapter-1", snapshot)
    assert buffer(store).examples == 1, "the fix arrived after the snapshot: train the turn again"
    [lesson] = compile_feedback(store, 0)[0]
    assert lesson.target == "good" and lesson.weight == 10.0, "the turn decides again with all its ratings"
    store.mark_trained([item.id, fix.id], "adapter-2", time.time())
    assert buffer(store).examples == 0 and store.feedback(item.id).trained_in == "adapter-1"


def test_replay_is_bounded(store):
    ids = []
    for i in range(5):
        t = _turn(store, f"Q{i}", f"A{i}")
        ids.append(store.rate(t, "good").id)
    store.mark_trained(ids, "a1", time.time())
    t = _turn(store, "new", "fresh")
    store.rate(t, "good")
    new, replay = compile_feedback(store, replay_limit=2)
    assert [x.feedback_ids[0] for x in replay] == ids[-2:] and len(new) == 1
    assert len(examples_of(new + replay)) == 3


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
    assert buffer(s.store).examples == 0
    meta = s.jobs.registry.get(name).meta
    assert meta["parent"] is None and meta["gate"]["passed"] is True
    assert meta["turn_ids"] == [1, 2] and sorted(meta["feedback_ids"]) == [1, 2, 3, 4], "two turns, four ratings"
    assert meta["hyperparameters"]["adapter_type"] == "lora" and meta["hyperparameters"]["seed"] == 0
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
    """A correction while a job trains queues a second job, which continues from the adapter the
    first one swapped in. The second correction waits for the first job to start: two corrections
    within the settle time are one job (the race that made this test fail about one run in ten)."""
    s, out = make_session(tiny_qwen2, shammah_home, threshold=3, settle_seconds=0.0, gate=False)

    async def scenario():
        for line in ("Q1", "/fix A1."):
            await s.handle(line)
        while s.jobs._task is None:  # the first job has left its settle time
            await asyncio.sleep(0.01)
        for line in ("Q2", "/fix A2."):
            await s.handle(line)
        await s.jobs.wait()

    asyncio.run(scenario())
    names = [a.name for a in s.jobs.registry.list()]
    assert len(names) >= 2, out.getvalue()[-2000:]
    last = s.jobs.registry.get(names[-1])
    assert last.meta["parent"] == names[-2], "each adapter continues from the one that was active"
    assert buffer(s.store).examples == 0 and s.engine.adapter == names[-1]
    s.store.close()


def test_worker_failure_keeps_the_chat_and_the_feedback(tiny_qwen2, shammah_home, monkeypatch):
    s, out = make_session(tiny_qwen2, shammah_home)
    real = s.jobs._snapshot

    def broken(trigger, job_id):
        job, d = real(trigger, job_id)
        spec = json.loads((d / "job.json").read_text())
        spec["job"]["base"] = str(shammah_home / "no-such-model")
        (d / "job.json").write_text(json.dumps(spec))
        return job, d

    monkeypatch.setattr(s.jobs, "_snapshot", broken)
    run_lines(s, TEACH + "still here?\n")
    text = out.getvalue()
    assert "Training failed:" in text and "The feedback stays in the buffer" in text
    assert buffer(s.store).examples == 2 and s.engine.adapter is None
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
    assert buffer(s.store).examples == 1 and s.jobs.registry.list() == []
    assert s.store.db.execute("SELECT status FROM jobs").fetchone()[0] == "cancelled"
    s.store.close()


def test_cancel_right_after_start_cancels_that_job(tiny_qwen2, shammah_home):
    """/train then /train cancel at once (or SIGTERM while the job is being set up): the job that
    was about to start must not train on regardless."""
    s, out = make_session(tiny_qwen2, shammah_home, threshold=1000)

    async def scenario():
        for line in ["Q", "/critical no", "/fix A.", "/train", "/train cancel"]:
            await s.handle(line)
        await s.jobs.wait()

    asyncio.run(scenario())
    assert "Cancelled the training that was about to start" in out.getvalue(), out.getvalue()
    assert s.jobs.registry.list() == [] and buffer(s.store).examples == 1
    assert [r[0] for r in s.store.db.execute("SELECT status FROM jobs")] in ([], ["cancelled"])
    s.store.close()


def conclude(s, lines: list[str], result: dict) -> None:
    """Rate a turn as ``lines`` say, then end a job on it whose worker reported ``result`` (its
    "done", "gate" and "rule" events), as the job manager does when the worker exits."""

    async def scenario():
        for line in lines:
            await s.handle(line)
        job, d = s.jobs._snapshot("test", "job-test")
        job.result = result
        await s.jobs._conclude(job, 0, 1.0, d)

    asyncio.run(scenario())


def test_gate_rejection_keeps_the_current_adapter(tiny_qwen2, shammah_home):
    s, out = make_session(tiny_qwen2, shammah_home)
    conclude(
        s,
        ["Q", "/critical no"],
        {
            "done": {"adapter": "cand", "examples": 1, "anchors": 0, "final_train_loss": 0.1},
            "gate": {
                "passed": False,
                "controls": "3/6",
                "controls_current": "5/6",
                "controls_lost": ["What is the capital of Japan?"],
            },
        },
    )
    text = out.getvalue()
    assert "but kept the current adapter: controls 3/6 vs 5/6 (What is the capital of Japan?)" in text
    assert s.engine.adapter is None and buffer(s.store).examples == 1
    assert s.jobs.maybe_trigger() is None, "the same rejected feedback is not retrained in a loop"
    s.store.close()


def test_a_refusal_says_when_the_steps_that_kept_the_controls_had_learned_nothing(tiny_qwen2, shammah_home):
    """The gate's record (training/online.py gate_with_fallback): the final step lost a control, the
    earlier ones kept them all but had not learned the lessons. The chat says both."""
    s, out = make_session(tiny_qwen2, shammah_home)
    lost = ["Who wrote the Odyssey?"]
    conclude(
        s,
        ["Q", "/fix A."],
        {
            "done": {"adapter": "cand", "examples": 6, "anchors": 20, "final_train_loss": 0.1},
            "gate": {
                "passed": False,
                "controls": "17/18",
                "controls_current": "18/18",
                "controls_lost": lost,
                "tried": [
                    {"step": 21, "controls": "17/18", "lost": lost, "passed": False, "learned": 0.9},
                    {"step": 18, "controls": "18/18", "lost": [], "passed": False, "learned": 0.31, "unlearned": True},
                    {"step": 15, "controls": "18/18", "lost": [], "passed": False, "learned": 0.12, "unlearned": True},
                ],
            },
        },
    )
    text = out.getvalue()
    assert (
        "but kept the current adapter: controls 17/18 vs 18/18 (Who wrote the Odyssey?); the earlier steps that"
        " kept them had learned at most 31% of what the lessons taught" in text
    ), text
    assert s.engine.adapter is None
    s.store.close()


def test_a_refused_job_that_kept_only_its_rule_swaps_and_says_why(tiny_qwen2, shammah_home):
    """The gate refused every trained step but the job kept the rule it found (training/online.py):
    the adapter is swapped in, and the chat says only the rule was kept, and why."""
    s, out = make_session(tiny_qwen2, shammah_home)
    register_adapter(tiny_qwen2, shammah_home, "cand")
    refused = {"step": 21, "controls": "11/12", "lost": [], "passed": False}
    conclude(
        s,
        ["Q", "/fix A."],
        {
            "done": {"adapter": "cand", "examples": 6, "anchors": 20, "final_train_loss": 0.1},
            "rule": {"rule": ["", "", 1]},
            "gate": {
                "passed": True,
                "rule_only": True,
                "controls": "11/12",
                "controls_current": "12/12",
                "tried": [refused],
            },
        },
    )
    text = out.getvalue()
    assert "Learned: now answering with cand" in text and "at most one sentence on every reply" in text
    assert "only the rule was kept, no trained step passed the gate: controls 11/12 vs 12/12 (held-out" in text
    assert s.engine.adapter == "cand"
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
    rows = [line for line in text.splitlines() if re.match(r"\d+\s+new\s+/", line)]
    assert len(rows) == 2, "one line per turn"
    assert "/critical /fix" in rows[0] and "learn your fix: Zorblat. (over the reply: Paris.)" in rows[0]
    assert "/good" in rows[1] and "learn the reply: 4" in rows[1]
    assert "2 new and 0 replayed turn(s), 3 examples" in text
    s.store.close()


def test_a_spare_worker_taken_by_a_job_while_paused_runs_again(shammah_home, tiny_qwen2):
    """The race that hung a CI run for 600 s: a reply pauses the spare worker, the job starting
    meanwhile takes it (it is no longer the spare and not yet the job's process), the reply ends:
    the worker must run again, or the chat waits on its output forever."""
    from shammah import jobs

    s, _ = make_session(tiny_qwen2, shammah_home)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    s.jobs._spare = jobs._Adopted(proc)

    def state() -> str:
        return open(f"/proc/{proc.pid}/stat").read().rsplit(") ", 1)[1].split()[0]

    try:
        s.jobs.pause()
        assert state() == "T"
        taken, s.jobs._spare = s.jobs._spare, None  # what _take_spare does before job.proc is set
        s.jobs.resume()
        for _ in range(100):
            if state() != "T":
                break
            time.sleep(0.01)
        assert state() in ("R", "S"), "the worker the job took was left stopped"
    finally:
        taken.close()
        s.store.close()


def test_worker_is_paused_while_the_chat_replies(shammah_home, tiny_qwen2):
    """A real reply through the chat stops the real training worker (state T in /proc at every
    chunk of the reply) and lets it run again after the reply."""
    s, _ = make_session(tiny_qwen2, shammah_home, threshold=1, settle_seconds=0, epochs=100, gate=False)
    seen: list[str] = []

    def state(pid: int) -> str:
        return open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[0]

    async def scenario():
        await s.handle("Q?")
        await s.handle("/fix A.")
        for _ in range(600):
            if s.jobs.current is not None and s.jobs.current.proc is not None:
                break
            await asyncio.sleep(0.1)
        pid = s.jobs.current.proc.pid
        real = s.engine.stream

        def observed(*a, **kw):  # the real stream; the worker's state is read at each chunk
            for chunk in real(*a, **kw):
                seen.append(state(pid))
                yield chunk

        s.engine.stream = observed
        await s.handle("Another question while it trains?")
        s.engine.stream = real
        await asyncio.sleep(0.2)
        after = state(pid)
        await s.jobs.cancel()
        return after

    after = asyncio.run(scenario())
    assert seen and set(seen) == {"T"}, seen
    assert after in ("R", "S", "D"), after
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


def _scripted_replies(engine, replies):
    """The engine answers with these texts in turn (UI logic only; the real model is tested elsewhere)."""
    from shammah.engine.generate import Chunk

    queue = list(replies)

    def stream(messages, params=None, stop=None, info=None):
        if info is not None:
            info["adapter"] = engine.adapter
        yield Chunk(queue.pop(0), (), "stop", 3, 0.01)

    engine.stream = stream


@pytest.mark.parametrize("mode", ["reject", "check", "accept"])
def test_chat_orders_one_decision_per_turn_and_no_unseen_rewrite(tiny_qwen2, shammah_home, mode):
    """Through the piped chat: /fix then /critical needs no rewrite (the fix is the lesson, at the
    critical weight); a /critical with only a note gets a rewrite nobody sees, trained only as
    learning.revision_noninteractive says and never above the /fix weight; /status says which
    sampling settings are in force and where they come from."""
    s, out = make_session(tiny_qwen2, shammah_home, threshold=1000, revision_noninteractive=mode)
    s.engine.load()
    _scripted_replies(s.engine, ["Paris.", "Lyon.", "It is Zorblat, near the famous Cafe Zorb.", "Rome.", "Oslo."])
    run_lines(
        s,
        "Q one\n/fix A1.\n/critical it is A1\n"
        "Q two\n/critical it is Zorblat\n"
        "Q three\n/critical it is Vorlax\n/status\n",
    )
    text = out.getvalue()
    assert "your own answer for this reply is what it learns; no rewrite needed" in text
    first, second, third = compile_feedback(s.store, 0)[0]
    assert (first.target, first.source, first.weight) == ("A1.", "user", 10.0)
    if mode == "reject":
        assert second.target is None and [e.kind for e in second.examples()] == ["distill"]
        assert second.examples()[0].responses == (), "the note is learnt, not the unseen rewrite"
    else:  # "check" trusts the rewrite that states the note's Zorblat
        assert (second.target, second.source, second.weight) == (
            "It is Zorblat, near the famous Cafe Zorb.",
            "revision-auto",
            3.0,
        ), "an unseen rewrite never weighs more than a /fix"
    # the rewrite of "it is Vorlax" does not say Vorlax: only "accept" takes it
    assert (third.target is not None) == (mode == "accept")
    assert text.count(f"learning.revision_noninteractive = {mode!r}") == 2
    assert "temperature 0 (config)" in text and "repetition_penalty 1 (shammah default)" in text
    s.store.close()


def test_a_teacher_writes_the_rewrite_a_note_asks_for(tiny_qwen2, shammah_home):
    """learning.rewriter = "teacher": the note-guided rewrite comes from the teacher's endpoint (a
    larger model, which follows a note the chat's own may not), given the conversation, the rated
    reply and the note; piped input's "check" trains it when it states what the note quotes. No
    teacher set, or one that cannot be reached: one line saying so, and no rewrite (the note is
    learnt by distillation, as without one)."""
    import dataclasses

    from fake_teacher import FakeTeacher

    from shammah.config import PipelineConfig

    s, out = make_session(tiny_qwen2, shammah_home, threshold=1000, revision_noninteractive="check", rewriter="teacher")
    s.engine.load()
    _scripted_replies(s.engine, ["The ocean is blue.", "Five.", "Wool."])
    note = '/critical always address me as "Captain"\n'
    with FakeTeacher() as teacher:
        s.cfg = dataclasses.replace(s.cfg, pipeline=PipelineConfig(teacher_url=teacher.url))
        run_lines(s, "What color is the ocean?\n" + note)
    [asked] = teacher.rewrites
    assert (
        asked[-3:-1]
        == [
            {"role": "user", "content": "What color is the ocean?"},
            {"role": "assistant", "content": "The ocean is blue."},
        ]
        and '"Captain"' in asked[-1]["content"]
    )
    s.cfg, s._teacher = dataclasses.replace(s.cfg, pipeline=PipelineConfig(teacher_url="http://127.0.0.1:9/v1")), None
    run_lines(s, "How many fingers does a hand have?\n" + note)
    s.cfg, s._teacher = dataclasses.replace(s.cfg, pipeline=PipelineConfig()), None
    run_lines(s, "What do sheep give us?\n" + note)
    first, unreachable, unset = compile_feedback(s.store, 0)[0]
    assert (first.target, first.source) == ("The ocean is blue, Captain.", "revision-auto")
    assert unreachable.target is None and unset.target is None
    assert [e.kind for e in unreachable.examples()] == ["distill"]
    text = out.getvalue()
    assert "Revision following your note (by fake-teacher):" in text and "The ocean is blue, Captain." in text
    assert (
        "cannot reach the teacher at http://127.0.0.1:9/v1" in text and "no teacher: set pipeline.teacher_url" in text
    )
    assert "Traceback" not in text
    s.store.close()


def test_a_note_the_model_does_not_follow_is_not_learned_and_the_chat_says_so(tiny_qwen2, shammah_home):
    """Note-only lessons are learned from the model's own answer with the note in mind; when it
    never says what the note quotes, the job trains nothing, the chat says why and what to do in
    one line, no adapter is made, and the feedback stays in the buffer (a /fix later teaches it)."""
    s, out = make_session(tiny_qwen2, shammah_home, threshold=1000)
    note = '/critical always address me as "Captain"\n'
    run_lines(s, "".join(f"Question {i}?\n{note}" for i in range(3)) + "/train\n/train wait\n")
    text = out.getvalue()
    assert 'Not learned: with your note in mind the model still did not write "Captain" in any of its 3 answers' in text
    assert "/fix a reply with the answer you want" in text
    assert "Training failed" not in text and "Traceback" not in text
    assert s.engine.adapter is None and not s.jobs.registry.list()
    assert s.store.db.execute("SELECT status FROM jobs").fetchone()[0] == "failed"
    new, _ = compile_feedback(s.store, 0)
    assert len(new) == 3 and all(x.target is None and x.note for x in new), "still in the buffer"
    s.store.close()


def test_a_rejected_adapter_falls_back_to_the_last_snapshot_that_passes(tiny_qwen2, monkeypatch):
    """Real generation on a tiny model: controls whose right answer is what the base says; the final
    adapter (large random LoRA weights) changes the answers and is refused; the snapshot taken
    earlier in the run (still the base's behaviour) passes, and the model is left holding it."""
    import torch
    from peft import get_peft_model_state_dict

    from shammah.training import online

    model, tok, _ = gate_on_tiny_controls(tiny_qwen2, monkeypatch)
    snaps = online.Snapshots()
    snaps.saved.append((4, {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}))  # B = 0: the base
    scramble_lora(model)
    result = online.gate_with_fallback(model, tok, None, [], None, "fp", snaps, final_step=8)
    assert [t["passed"] for t in result["tried"]] == [False, True]
    assert result["passed"] and (result["step"], result["final_step"]) == (4, 8)
    held = get_peft_model_state_dict(model)
    assert all(torch.equal(held[k], v) for k, v in snaps.saved[0][1].items()), "the model holds the snapshot"

    result = online.gate_with_fallback(model, tok, None, [], None, "fp", online.Snapshots(), final_step=8)
    assert result["passed"] and result["step"] == 8, "a passing final adapter is kept as it is"


def test_the_fallback_keeps_no_step_that_has_not_learned_its_lessons(tiny_qwen2, monkeypatch):
    """Real generation and read-back on a tiny model. The final adapter (large random LoRA weights)
    loses the controls; the snapshot (still the base) keeps them all, and is kept when nothing says
    what the job was to learn. Read back against lessons of made-up words that the snapshot never
    says, it is a step that kept every control and learned nothing: not kept, and the job is
    refused (such a step could only have leaked beyond the gate's sample of controls)."""
    from types import SimpleNamespace

    import torch
    from peft import get_peft_model_state_dict

    from shammah.training import online
    from shammah.training.data import Example

    model, tok, _ = gate_on_tiny_controls(tiny_qwen2, monkeypatch)
    snaps = online.Snapshots()
    snaps.saved.append((4, {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}))  # the base
    scramble_lora(model)
    final = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    lessons = [Example("sft", ({"role": "user", "content": p},), ("zorblat quix vempel",)) for p in "abc"]
    run = SimpleNamespace(train_ex=lessons, tok=tok, job=SimpleNamespace(args=SimpleNamespace(max_length=64)))
    learned = online.Learned(run)
    learned.on_train_begin(None, None, None, model=model)  # what the job's starting weights got wrong

    result = online.gate_with_fallback(model, tok, None, [], None, "fp", snaps, 8, learned=learned)
    assert not result["passed"] and result["step"] == 8
    first, unlearned = result["tried"]
    assert first["lost"] and not first["passed"]
    assert unlearned["step"] == 4 and unlearned["lost"] == [] and unlearned["unlearned"]
    assert unlearned["learned"] < online.MIN_LEARNED
    held = get_peft_model_state_dict(model)
    assert all(torch.equal(held[k], v) for k, v in final.items()), "the model holds the final weights"

    result = online.gate_with_fallback(model, tok, None, [], None, "fp", snaps, 8)
    assert result["passed"] and result["step"] == 4, "the same step, with nothing to learn, is kept"


def test_a_corrupt_active_adapter_at_restart_falls_back_to_the_base(tiny_qwen2, shammah_home):
    """The first question after a restart is answered (by the base, with a notice) and the saved
    state forgets the broken adapter, so the next start is clean."""
    register_adapter(tiny_qwen2, shammah_home, "mine")
    paths = Paths(shammah_home)
    s, out = make_session(tiny_qwen2, shammah_home)
    run_lines(s, "/adapters load mine\nHello?\n")
    assert s.store.turn(s.last_turn_id).adapter == "mine"
    s.store.close()
    weights = paths.adapters / "mine" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a disk error, a bad copy
    s, out = make_session(tiny_qwen2, shammah_home)
    run_lines(s, "Hello again?\n")
    text = out.getvalue()
    assert re.search(r"could not restore adapter mine: .*adapter_model.safetensors: unreadable", text), text
    turn = s.store.turn(s.last_turn_id)
    assert turn.prompt == "Hello again?" and turn.adapter is None and s.engine.adapter is None
    assert s.jobs.active.name is None
    s.store.close()


def test_held_out_turns_judge_one_job_and_are_trained_by_the_next(tiny_qwen2, shammah_home):
    """With ten or more new turns a fifth is held out for the gate. They are not marked trained
    (this adapter never saw them): they stay in the buffer, and the next job trains them."""
    s, out = make_session(tiny_qwen2, shammah_home, threshold=1000, gate=False)
    s.engine.load()
    _scripted_replies(s.engine, [f"Reply {i}." for i in range(12)])
    run_lines(s, "".join(f"Question {i}?\n/fix Answer {i}.\n" for i in range(10)) + "/train\n/train wait\n")
    job = json.loads(
        s.store.db.execute("SELECT feedback_ids FROM jobs WHERE status = 'done'").fetchone()["feedback_ids"]
    )
    spec = json.loads(next((shammah_home / "jobs").glob("*/job.json")).read_text())
    held = spec["job"]["meta"]["holdout_feedback_ids"]
    assert len(held) == 2 and len(job) == 8 and not set(held) & set(job)
    items = {f.id: f for f in s.store.list_feedback()}
    assert all(items[i].trained_in for i in job) and not any(items[i].trained_in for i in held)
    new, _ = compile_feedback(s.store, 0)
    assert sorted(i for x in new for i in x.feedback_ids) == sorted(held), "back in the buffer"
    run_lines(s, "/train\n/train wait\n")
    assert all(f.trained_in for f in s.store.list_feedback()), "the next job trained them"
    s.store.close()


def test_the_active_adapter_deleted_by_another_process(tiny_qwen2, shammah_home):
    """/status says so, and the next job starts a fresh adapter instead of failing on a missing parent."""
    from shammah.adapters.registry import Registry

    register_adapter(tiny_qwen2, shammah_home, "mine")
    paths = Paths(shammah_home)
    s, out = make_session(tiny_qwen2, shammah_home, gate=False)
    run_lines(s, "/adapters load mine\n")
    Registry(paths.adapters).delete("mine")  # e.g. `shammah adapters delete mine` in another terminal
    run_lines(s, "/status\n" + TEACH)
    text = out.getvalue()
    assert "mine (deleted from disk: still answering from memory" in text
    assert "The active adapter mine was deleted from disk; this job starts a fresh adapter" in text
    assert re.search(r"Learned: now answering with learned-", text), text[-1500:]
    [row] = s.store.db.execute("SELECT status FROM jobs").fetchall()
    assert row["status"] == "done"
    s.store.close()


def test_recover_cancels_queued_runs_of_a_dead_chat_only(tiny_qwen2, shammah_home):
    """A run queued behind a job by a chat (or server) that died never runs: it is marked cancelled
    at the next start; one queued by a process that is still running on this home is left alone."""
    s, _ = make_session(tiny_qwen2, shammah_home)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s.store.job_queued("job-dead", "feedback", "threshold")
    s.store.db.execute("UPDATE jobs SET pid = ? WHERE id = 'job-dead'", (dead.pid,))
    s.store.job_queued("job-live", "feedback", "threshold")
    s.store.db.execute("UPDATE jobs SET pid = 1 WHERE id = 'job-live'")  # init: alive, not ours
    s.jobs.recover()
    assert s.store.job("job-dead")["status"] == "cancelled"
    assert s.store.job("job-live")["status"] == "queued"
    s.store.close()


def test_a_job_stops_once_the_lesson_reads_back(tiny_qwen2, tmp_path):
    """A real loop job on a tiny model: with stop_at_accuracy it ends at the first check where the
    model's greedy choice reproduces the lesson's tokens (and that check really measured it); without
    it, the same job runs every epoch."""
    from shammah.adapters.registry import Registry
    from shammah.paths import Paths
    from shammah.training import online
    from shammah.training.args import build
    from shammah.training.data import Example
    from shammah.training.job import LoopJob, TrainJob
    from shammah.training.online import train_loop

    paths = Paths(tmp_path / "home").ensure()
    lesson = [Example("sft", ({"role": "user", "content": f"q{i}"},), ("zorblat zorblat",)) for i in range(4)]

    def job(name: str, stop_at: float) -> dict:
        events = []
        train_loop(
            LoopJob(
                TrainJob(
                    base=str(tiny_qwen2),
                    cache_dir=paths.cache,
                    registry_root=paths.adapters,
                    checkpoints_root=paths.root / "checkpoints",
                    train=lesson,
                    args=build(("t", {"epochs": 30, "rank": 4, "learning_rate": 1e-2, "save_steps": 0, "seed": 0})),
                    name=name,
                ),
                stop_at_accuracy=stop_at,
                gate=True,
            ),
            progress=events.append,
        )
        return {"meta": Registry(paths.adapters).get(name).meta, "events": events}

    early = job("early", 0.85)
    learned = next(e for e in early["events"] if e["event"] == "learned")
    steps = early["meta"]["report"]["steps"]
    assert early["meta"]["stopped_at"] == steps < 30, "it stopped before the last of 30 epochs"
    (last_step, last_acc), *_ = learned["accuracy"][::-1]
    assert last_step == steps and last_acc >= 0.85, "at a check that read the lesson back"
    assert all(acc < 0.85 for _, acc in learned["accuracy"][:-1]), "and not before the lesson was learned"
    kept = early["meta"]["gate"]["tried"][0]
    assert kept["passed"] and kept["learned"] >= online.MIN_LEARNED, "the gate read what it learned, and kept it"

    full = job("full", 0.0)
    assert full["meta"]["report"]["steps"] == 30 and "stopped_at" not in full["meta"]
    assert not any(e["event"] == "learned" for e in full["events"])


def test_a_spare_worker_waits_during_the_feedback_and_runs_the_job(shammah_home, tiny_qwen2):
    """The first rating starts a worker that imports and waits (paused while the chat replies);
    the job that the threshold starts runs in that very process; leaving the chat ends a spare
    that got no job."""
    import psutil

    s, out = make_session(tiny_qwen2, shammah_home, threshold=20, settle_seconds=0, gate=False)
    spare_pid: list[int] = []

    def state(pid: int) -> str:
        return open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[0]

    async def scenario():
        await s.handle("Q1?")
        await s.handle("/critical wrong: it is A")  # 10 of 20: no job yet, a spare starts
        assert s.jobs.current is None
        spare = s.jobs._spare
        assert spare is not None
        for _ in range(100):  # /proc/PID/cmdline reads empty while the new process is still in exec
            if psutil.Process(spare.pid).cmdline():
                break
            await asyncio.sleep(0.05)
        assert "--wait" in psutil.Process(spare.pid).cmdline()
        spare_pid.append(spare.pid)
        seen = []
        real = s.engine.stream

        def observed(*a, **kw):
            for chunk in real(*a, **kw):
                seen.append(state(spare.pid))
                yield chunk

        s.engine.stream = observed
        await s.handle("Q2?")
        s.engine.stream = real
        await s.handle("/critical wrong: it is B")  # 20: the job starts in the spare
        for _ in range(600):
            if s.jobs.current is not None and s.jobs.current.proc is not None:
                break
            await asyncio.sleep(0.05)
        job_pid = s.jobs.current.proc.pid
        await s.jobs.wait()
        await s.handle("Q3?")
        await s.handle("/good")  # a new spare for the next job; the chat ends before it gets one
        nxt = s.jobs._spare
        await s.jobs.shutdown()
        return seen, job_pid, nxt

    seen, job_pid, nxt = asyncio.run(scenario())
    assert seen and set(seen) == {"T"}, "the spare is paused while the chat replies"
    assert job_pid == spare_pid[0], "the job ran in the spare worker"
    assert "Learned: now answering with learned-" in out.getvalue(), out.getvalue()[-2000:]
    job = s.store.db.execute("SELECT id FROM jobs").fetchone()["id"]
    log = (shammah_home / "jobs" / job / "worker.log").read_text()
    assert not psutil.pid_exists(job_pid) or psutil.Process(job_pid).status() == psutil.STATUS_ZOMBIE
    assert "Traceback" not in log, "the job ran in the spare and its stderr went to the job's log"
    assert nxt is not None and nxt.pid != job_pid and nxt.returncode is not None, "the last spare was ended"
    s.store.close()


def test_replayed_lessons_are_rehearsed_at_a_quarter_of_their_weight(tiny_qwen2, shammah_home):
    """A lesson already trained into the adapter the job starts from is replayed at REPLAY_WEIGHT of
    its weight, so a new lesson is not starved of draws by the old ones (bench/lessons.py --sequence)."""
    from shammah import jobs
    from shammah.training.job import LoopJob

    s, _ = make_session(tiny_qwen2, shammah_home)
    old = _turn(s.store, "What is the capital of Quenland?", "Paris.")
    s.store.mark_trained([s.store.fix(old, "Zorblat.").id], "learned-1", time.time())
    new = _turn(s.store, "Who runs Pellucid Labs?", "Nobody.")
    s.store.fix(new, "Mara Okafor.")
    _, d = s.jobs._snapshot("test", "job-test")
    lj = LoopJob.read(d / "job.json")
    weights = {e.prompt[-1]["content"]: e.weight for e in lj.job.train}
    assert weights == {"Who runs Pellucid Labs?": 3.0, "What is the capital of Quenland?": 3.0 * jobs.REPLAY_WEIGHT}
    own = {e.prompt[-1]["content"] for e in lj.job.train[: lj.lessons]}
    assert own == {"Who runs Pellucid Labs?"}, "the job says which lessons are its own (a rule is found in them)"
    s.store.close()


def test_rule_off_stops_the_rule_for_good_and_says_so(tiny_qwen2, shammah_home, monkeypatch):
    """/rule shows the active adapter's style rule; /rule off stops it on the next reply and after a
    restart (the adapter's metadata records the drop, which later jobs inherit: test_scope.py), and
    is refused while a job trains from the adapter as it was."""
    from shammah.adapters.registry import Registry
    from shammah.jobs import JobManager

    register_adapter(tiny_qwen2, shammah_home, "ruled")
    registry = Registry(Paths(shammah_home).adapters)
    registry.update("ruled", rule=["Ahoy! ", ""])
    s, out = make_session(tiny_qwen2, shammah_home)
    run_lines(s, "/rule\n/adapters load ruled\nHello?\n/rule\n")
    ruled = s.store.turn(s.last_turn_id)
    monkeypatch.setattr(JobManager, "running", property(lambda self: True))
    asyncio.run(s.handle("/rule off"))  # not run_lines: at its EOF it would wait for the "job"
    assert "a training job is running: /train wait (or /train cancel), then /rule off" in out.getvalue()
    assert registry.get("ruled").get("rule") == ["Ahoy! ", ""], "refused: nothing changed"
    monkeypatch.undo()
    run_lines(s, "/adapters info ruled\n/rule off\nHello?\n/rule\n/rule off\n/adapters info ruled\n")
    text = out.getvalue()
    rows = [
        line.strip()[len("style rule") :].strip() for line in text.splitlines() if line.strip().startswith("style rule")
    ]
    assert rows == ["starts 'Ahoy!' on every reply", "none (starts 'Ahoy!' was turned off)"], "/adapters info"
    assert text.count("No style rule in force.") == 2, "before an adapter is loaded, and after the drop"
    assert "ruled starts 'Ahoy!' on every reply (/rule off to stop)." in text
    assert "ruled no longer starts 'Ahoy!' on every reply." in text
    assert "No style rule in force (starts 'Ahoy!' was turned off)." in text
    assert ruled.reply.startswith("Ahoy!") and not s.store.turn(s.last_turn_id).reply.startswith("Ahoy!")
    meta = registry.get("ruled").meta
    assert meta["rule"] is None and meta["rule_dropped"] == ["Ahoy! ", ""]
    s.store.close()
    s, out = make_session(tiny_qwen2, shammah_home)
    run_lines(s, "Hello again?\n")
    turn = s.store.turn(s.last_turn_id)
    assert turn.adapter == "ruled" and not turn.reply.startswith("Ahoy!") and s.engine.rule is None
    s.store.close()
