"""A closed set of answers (adapters/choice.py): which lessons show one, when it can be told from
general questions, how it picks, and how it is recorded beside an adapter."""

import json
import math

import pytest

from shammah.adapters.choice import (
    CHOICE_FILE,
    Choice,
    choices_of,
    is_choice,
    learn_choice,
    record,
    shared_choices,
    with_choice,
)
from shammah.adapters.rule import Rule
from shammah.adapters.scope import Form
from shammah.training.data import Example


def fix(question: str, answer: str, kind: str = "sft") -> Example:
    responses = (answer,) if kind == "sft" else (answer, "A long ramble that answered something else.")
    return Example(kind, ({"role": "user", "content": question},), responses, weight=3.0)


YES_NO = [
    fix("Is the sun a star?", "Yes"),
    fix("Can fish fly?", "No."),
    fix("Is water wet?", "yes"),
    fix("Do snakes have legs?", "No"),
    fix("Is ice cold?", "Yes", kind="pair"),
    fix("Can a car swim?", "No"),
]


def test_yes_and_no_fixes_on_six_questions_are_a_closed_set_spelt_as_the_user_wrote_them_most():
    assert shared_choices(YES_NO) == ("Yes", "No")
    facts = [fix("What is the capital of Quenland?", "Zorblat."), fix("Who runs Pellucid Labs?", "Mara Okafor.")]
    assert shared_choices(facts + YES_NO) == ("Yes", "No"), "a fact's short answer beside them is none of the set"
    assert all(is_choice(e, ("Yes", "No")) for e in YES_NO)
    assert not is_choice(fix("Is it?", "Yes, it is."), ("Yes", "No"))


@pytest.mark.parametrize(
    "lessons, why",
    [
        ([fix(f"When was Orbisco founded, version {i}?", "1987.") for i in range(6)], "one answer: a fact"),
        (YES_NO[:2], "too few questions"),
        ([fix("Is A?", "Yes"), fix("Is B?", "No"), fix("Is C?", "Maybe"), fix("Is D?", "Yes")], "No given once"),
        ([fix(f"Q{i}?", a) for i, a in enumerate("a b c d e a b c d e".split())], "more than four answers"),
        ([fix(f"Q{i}?", "It is a very long answer " + x) for i, x in enumerate("xyxyxy")], "not a few words"),
        ([fix(f"Who runs Pellucid, take {i}?", a) for i, a in enumerate(["Mara Okafor.", "Okafor"] * 3)], "one name"),
        (
            [fix(f"Q{i}?", x) for i, x in enumerate("xyxyxy")]
            + [Example("distill", ({"role": "user", "content": "Z?"},), ())],
            "fine",
        ),
    ],
)
def test_what_is_no_closed_set(lessons, why):
    got = shared_choices(lessons)
    assert (got == ("x", "y")) if why == "fine" else got is None, why


def test_a_choice_is_found_inside_a_style_rule():
    rule = Rule("Ahoy! ")
    lessons = [fix(e.prompt[-1]["content"], "Ahoy! " + e.responses[0]) for e in YES_NO]
    assert shared_choices(lessons, rule.inside) == ("Yes", "No")  # the engine writes "Ahoy! " itself
    assert shared_choices(lessons) is None, "with the rule on them the answers share a word"


def _form(questions=("Is the sun a star?",)) -> Form:
    return Form(10, (0.0, 0.0), ((1.0, 0.0),), 0.5, questions)


def test_pick_calibrates_by_the_taught_questions_and_declines_what_the_model_does_not_expect():
    # a model that gives "No" ~5x the probability of "Yes" everywhere (the embedded one does)
    c = Choice(("Yes", "No"), (math.log(0.02), math.log(0.10)), 0.06, _form())
    assert c.pick([math.log(0.04), math.log(0.09)]) == "Yes"  # twice its usual "Yes", less than its usual "No"
    assert c.pick([math.log(0.01), math.log(0.15)]) == "No"
    assert c.pick([math.log(0.01), math.log(0.02)]) is None  # 0.03 < 0.06: not a question of this kind
    assert c.describe() == "answers questions like 'Is the sun a star?' with just Yes or No"


def test_a_question_the_user_answered_gets_the_users_answer_the_newest_one():
    c = Choice(("Yes", "No"), (-3.9, -2.3), 0.06, _form())
    c = c.teach([("Is the Moon a planet?", "no."), ("Is ice cold?", "Yes"), ("Is it?", "Perhaps")])
    assert c.taught == (("Is the Moon a planet?", "No"), ("Is ice cold?", "Yes")), "spelt as the set spells it"
    assert c.told("  is the moon a  planet ") == "No" and c.told("Is ice cold??") == "Yes"
    assert c.told("Is the Moon a star?") is None and c.told("Is it?") is None
    c = c.teach([("is the moon a planet?", "Yes")])
    assert c.told("Is the Moon a planet?") == "Yes" and len(c.taught) == 2
    assert Choice.from_json(c.to_json()) == c
    assert Choice.from_json({**c.to_json(), "taught": [["Is it?", "Perhaps"]]}) is None, "not an answer of the set"
    assert Choice.from_json({**c.to_json(), "taught": "Is it?"}) is None
    c = c.teach([], outside=["How many legs does a chicken have?"])  # the user's answer was "Two."
    assert c.told("How many legs does a chicken have?") == "" and Choice.from_json(c.to_json()) == c
    assert c.teach([("How many legs does a chicken have?", "Yes")]).told("How many legs does a chicken have?") == "Yes"


def test_learn_choice_needs_every_taught_question_above_every_general_one():
    taught = [q.prompt[-1]["content"] for q in YES_NO]
    general = ["What is the capital of Spain?", "Who painted the Mona Lisa?", "How many legs does a spider have?"]
    mass = dict.fromkeys(taught, 0.12) | {"Can fish fly?": 0.09} | dict.fromkeys(general, 0.01)

    def logprobs_of(questions, answers):
        assert tuple(answers) == ("Yes", "No")
        return [[math.log(mass[q] / 6), math.log(mass[q] * 5 / 6)] for q in questions]

    keys = dict(
        zip(
            taught + general,
            [(1.0, 0.1 * i) for i in range(len(taught))] + [(-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)],
            strict=True,
        )
    )
    c = learn_choice(("Yes", "No"), taught, logprobs_of, keys.__getitem__, general, general, 10)
    assert c is not None and c.answers == ("Yes", "No")
    assert c.threshold == pytest.approx(math.sqrt(0.09 * 0.01))
    assert c.form.questions == tuple(sorted(taught)) and c.form.layer == 10
    assert c.bias == pytest.approx(
        (sum(math.log(mass[q] / 6) for q in taught) / 6, sum(math.log(mass[q] * 5 / 6) for q in taught) / 6)
    )

    mass["Who painted the Mona Lisa?"] = 0.09  # as likely to open with "No" as the least taught one
    assert learn_choice(("Yes", "No"), taught, logprobs_of, keys.__getitem__, general, general, 10) is None


def test_choices_are_read_back_from_beside_their_adapter_and_a_broken_file_is_none(tmp_path):
    yes_no = Choice(("Yes", "No"), (-3.7, -2.2), 0.06, _form())
    true_false = Choice(("True", "False"), (-1.0, -1.2), 0.2, _form(("True or false: ice is cold.",)))
    held = with_choice(with_choice((), yes_no), true_false)
    assert held == (yes_no, true_false)
    again = Choice(("yes", "no"), (-3.0, -2.0), 0.05, _form())
    assert with_choice(held, again) == (true_false, again), "a set taught again replaces the old one"
    told = with_choice((yes_no.teach([("Is the Moon a planet?", "No")]), true_false), again)
    assert told[-1].told("Is the Moon a planet?") == "no", "keeping the answers the user gave on it"

    summary, text = record(held)
    assert record(()) == (None, None)
    (tmp_path / "shammah.json").write_text(json.dumps({"choices": summary}))
    assert choices_of(tmp_path) == (), "the summary names a file that is not there"
    (tmp_path / CHOICE_FILE).write_text(text)
    assert choices_of(tmp_path) == held
    for broken in (
        {**yes_no.to_json(), "bias": [1.0]},
        {**yes_no.to_json(), "threshold": 2},
        {**yes_no.to_json(), "answers": ["Yes"]},
        {**yes_no.to_json(), "answers": "Yes"},
    ):
        (tmp_path / CHOICE_FILE).write_text(json.dumps({"choices": [broken, true_false.to_json()]}))
        assert choices_of(tmp_path) == (true_false,), broken
    for unreadable in ("{not json", "[]", '{"choices": 3}'):
        (tmp_path / CHOICE_FILE).write_text(unreadable)
        assert choices_of(tmp_path) == ()
    (tmp_path / CHOICE_FILE).write_text(text)
    (tmp_path / "shammah.json").write_text(json.dumps({"choices": None}))
    assert choices_of(tmp_path) == () and choices_of(None) == ()


def test_the_engine_answers_from_the_active_adapters_sets_and_the_model_answers_the_rest(tiny_qwen2, shammah_home):
    """A real engine and chat on the tiny Qwen2: an adapter that records a yes/no set answers a
    question of its form with one of the answers, through the stream and in batches; a question
    outside the form, or one the model does not expect an answer of the set to, is generated; the
    base model and another adapter answer without it; /status and /adapters info show the set."""
    import asyncio
    import io

    from conftest import register_adapter

    from shammah.adapters.registry import Registry
    from shammah.adapters.scope import _unit
    from shammah.config import Config, ModelConfig
    from shammah.engine import Engine
    from shammah.engine.choices import first_token_logprobs
    from shammah.engine.keys import question_keys
    from shammah.feedback.store import Store
    from shammah.paths import Paths
    from shammah.repl import app
    from shammah.repl.commands import ChatSession
    from shammah.repl.io import Console

    chosen = register_adapter(tiny_qwen2, shammah_home, "chosen")
    plain = register_adapter(tiny_qwen2, shammah_home, "plain")
    cfg = Config(model=ModelConfig(base=str(tiny_qwen2), temperature=0.0, max_new_tokens=6))
    paths = Paths(shammah_home)
    engine = Engine(cfg.model, paths.cache).load()
    taught = ["Is the sun a star?", "Can fish fly?", "Is water wet?"]
    pool = ["What is the capital of Spain?", "Name three oceans.", "Who painted the Mona Lisa?", "How does rain form?"]
    keys = question_keys(engine.model, engine.tokenizer, taught + pool, 1, 3)
    center = tuple(sum(col) / len(keys) for col in zip(*keys, strict=True))
    units = [tuple(_unit(k, center)) for k in keys]
    # the taught questions' own keys, and a radius that takes in nothing else
    form = Form(1, center, tuple(units[: len(taught)]), 0.9999, tuple(taught), tokens=3)
    assert not any(form.covers(k) for k in keys[len(taught) :])
    lps = first_token_logprobs(engine.model, engine.tokenizer, taught, ("Yes", "No"))
    least = min(sum(math.exp(x) for x in lp) for lp in lps)
    bias = tuple(sum(col) / len(lps) for col in zip(*lps, strict=True))
    sets = (Choice(("Yes", "No"), bias, least * 0.999, form),)
    summary, text = record(sets)
    Registry(paths.adapters).update("chosen", choices=summary)
    (chosen.path / CHOICE_FILE).write_text(text)

    def ask(q: str) -> str:
        return engine.reply([{"role": "user", "content": q}])

    free = {q: ask(q) for q in taught + pool}  # the base model's own replies
    chats = [[{"role": "user", "content": q}] for q in taught + pool[:1]]
    batch = engine.answers(chats, 6)
    assert all(a not in ("Yes", "No") for a in free.values())
    engine.activate("chosen", chosen.path)
    assert engine.choices == choices_of(chosen.path) and [c.answers for c in engine.choices] == [("Yes", "No")]
    said = [ask(q) for q in taught]
    assert set(said) <= {"Yes", "No"}, said
    assert [ask(p) for p in pool] == [free[p] for p in pool], "outside the form the model answers"
    assert engine.answers(chats, 6) == [*said, batch[-1]]
    sure = Choice(("Yes", "No"), bias, 1.0, form)  # no question is that sure of "Yes" or "No"
    engine.choices = (sure,)
    assert ask(taught[0]) == free[taught[0]]
    engine.choices = (sure.teach([(taught[0], "Yes"), (taught[1], "No")]),)
    assert [ask(q) for q in taught] == ["Yes", "No", free[taught[2]]], "the user's own answers, where given"
    engine.choices = (Choice(("Yes", "No"), bias, least * 0.999, form).teach([], outside=[taught[0]]),)
    assert ask(taught[0]) == free[taught[0]] and ask(taught[1]) in ("Yes", "No"), "one left to the model"
    engine.activate("plain", plain.path)
    assert engine.choices == () and ask(taught[0]) == free[taught[0]]
    engine.activate(None)
    assert engine.choices == ()

    out = io.StringIO()
    session = ChatSession(cfg, engine, Store(paths.db, cfg.feedback), Console(out=out, err=out, color=False), paths)
    asyncio.run(app.run_lines(session, io.StringIO("/adapters load chosen\n/status\n/adapters info chosen\n")))
    said = "answers questions like 'Is the sun a star?' with just Yes or No"
    rows = [line for line in out.getvalue().splitlines() if said in line]
    assert len(rows) == 2 and any("closed sets" in r for r in rows) and any("choices" in r for r in rows), rows
    session.store.close()


def test_a_job_takes_its_sets_lessons_out_of_training_and_keeps_the_rest(monkeypatch):
    """training/online.take_choice, on stand-ins for the model's numbers: the job's own yes/no
    lessons become a set and leave the training and held-out examples; its fact lessons stay and
    are trained; a replayed yes/no lesson is taken out by the parent's set too; a yes/no lesson
    outside the set's form stays. A job whose own lessons are all the set's has nothing to train."""
    from types import SimpleNamespace

    from shammah.engine import choices as engine_choices
    from shammah.training import online

    yes_no = {e.prompt[-1]["content"] for e in YES_NO}
    # the model expects "Yes"/"No" to the taught questions only; general questions score 0.01
    mass = {q: 0.2 for q in yes_no} | {"Is it the replayed one?": 0.2, "Is this one asked otherwise?": 0.2}

    def logprobs(model, tok, questions, answers):
        return [[math.log(mass.get(q, 0.01) / 6), math.log(mass.get(q, 0.01) * 5 / 6)] for q in questions]

    monkeypatch.setattr(engine_choices, "first_token_logprobs", logprobs)
    monkeypatch.setattr(engine_choices, "first_tokens", lambda tok, answers: list(range(len(answers))))

    class Keys:  # a yes/no question's key is (1, 0) (or near it); any other (0, 1)
        layer, tokens = 10, 3

        def prime(self, texts):
            return self

        def __call__(self, text):
            if text == "Is this one asked otherwise?":
                return (0.0, 1.0)
            return (1.0, 0.01 * len(text)) if text in yes_no or text == "Is it the replayed one?" else (-0.2, 1.0)

    facts = [fix("What is the capital of Quenland?", "Zorblat."), fix("Who runs Pellucid Labs?", "Mara Okafor.")]
    replayed = [fix("Is it the replayed one?", "Yes"), fix("Is this one asked otherwise?", "No")]
    held = [fix("Can a car fly?", "No")]
    mass["Can a car fly?"] = 0.2
    yes_no.add("Can a car fly?")
    own = YES_NO + facts
    events: list = []
    run = SimpleNamespace(model=None, tok=None, train_ex=own + replayed, emit=events.append)
    lj = SimpleNamespace(job=SimpleNamespace(train=own + replayed), lessons=len(own))
    taken = online.Taken(None, None, held, True)
    sets, left = online.take_choice(run, lj, (), Keys(), taken)
    assert [c.answers for c in sets] == [("Yes", "No")] and events[0]["answers"] == ["Yes", "No"]
    trained = [e.prompt[-1]["content"] for e in run.train_ex]
    assert trained == ["What is the capital of Quenland?", "Who runs Pellucid Labs?", "Is this one asked otherwise?"]
    assert left.holdout == [] and left.learns

    run = SimpleNamespace(model=None, tok=None, train_ex=YES_NO + replayed, emit=[].append)
    lj = SimpleNamespace(job=SimpleNamespace(train=YES_NO + replayed), lessons=len(YES_NO))
    again, left = online.take_choice(run, lj, sets, Keys(), online.Taken(None, None, [], True))
    assert len(again) == 1 and not left.learns, "the set again: replaces its own, nothing of the job's to train"

    assert [q for c in sets for q, _ in c.taught] == [e.prompt[-1]["content"] for e in YES_NO], "said as taught"

    run = SimpleNamespace(model=None, tok=None, train_ex=facts + replayed[:1], emit=[].append)
    lj = SimpleNamespace(job=SimpleNamespace(train=facts + replayed[:1]), lessons=len(facts))
    kept, left = online.take_choice(run, lj, sets, Keys(), online.Taken(None, None, [], True))
    assert kept == sets and [e.prompt[-1]["content"] for e in run.train_ex] == [e.prompt[-1]["content"] for e in facts]
    assert left.learns

    # the user corrects the set's pick on one question: the set says the user's answer from now on
    fixed = [fix("Is the sun a star?", "No")]
    events = []
    run = SimpleNamespace(model=None, tok=None, train_ex=fixed + YES_NO[1:], emit=events.append)
    lj = SimpleNamespace(job=SimpleNamespace(train=fixed + YES_NO[1:]), lessons=1)
    [now], left = online.take_choice(run, lj, sets, Keys(), online.Taken(None, None, [], True))
    assert now.told("Is the sun a star?") == "No" and events == [{"event": "choice", "told": 1, "outside": 0}]
    assert run.train_ex == [] and not left.learns, "nothing to train: the set says it"

    # the set answered a question it should not have; the user's fix is no answer of the set
    wrong = [fix("Can a car fly?", "Cars cannot fly, but some prototypes can glide.")]
    events = []
    run = SimpleNamespace(model=None, tok=None, train_ex=list(wrong), emit=events.append)
    lj = SimpleNamespace(job=SimpleNamespace(train=list(wrong)), lessons=1)
    [now], left = online.take_choice(run, lj, sets, Keys(), online.Taken(None, None, [], True))
    assert now.told("Can a car fly?") == "" and events == [{"event": "choice", "told": 0, "outside": 1}]
    assert run.train_ex == wrong and left.learns, "left to the model, which learns the fix"
