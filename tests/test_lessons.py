"""The lesson suite's fast subset (bench/lessons.py) on the real embedded model: a style rule that
applies to every answer, taught through the piped chat, scored on questions the loop never saw and
on controls that appear nowhere in shammah's anchors or gate controls. (The fact lesson runs through
the real CLI in test_learns_e2e.py.)"""

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import lessons as suite  # noqa: E402


@pytest.fixture(scope="module")
def engine(embedded_home):
    from shammah.config import ModelConfig
    from shammah.engine import Engine

    return Engine(ModelConfig(base="embedded", temperature=0.0), embedded_home / "cache").load()


def test_suite_is_separate_from_what_the_loop_tunes_on():
    from shammah.training import online

    tuned = set(online.ANCHOR_PROMPTS) | {q for q, _ in online.CONTROLS}
    suite_prompts = {q for q, _ in suite.CONTROLS} | {
        q for x in suite.LESSONS for q in [*(t for t, _ in x.teach), *x.held_out]
    }
    assert not tuned & suite_prompts
    assert not {q for q, _ in suite.CONTROLS} & {
        q for x in suite.LESSONS for q in [*(t for t, _ in x.teach), *x.held_out]
    }
    kinds = {(x.kind, x.order) for x in suite.LESSONS}
    assert len(suite.LESSONS) >= 12 and len(kinds) == 12, "every kind in every order"
    assert all(len(x.held_out) >= 6 and not set(x.held_out) & {t for t, _ in x.teach} for x in suite.LESSONS)


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["ahoy"])
def test_a_lesson_holds_on_paraphrases_without_losing_unseen_controls(engine, embedded_home, tmp_path, name):
    lesson = next(x for x in suite.LESSONS if x.name == name)
    before = suite.ask(engine, list(lesson.held_out))
    assert not any(lesson.follows(a) for a in before), "the base model does not know it yet"
    base_ctrl = suite.ask(engine, [q for q, _ in suite.CONTROLS])
    known = [
        i for i, (a, (_, oks)) in enumerate(zip(base_ctrl, suite.CONTROLS, strict=True)) if suite.control_ok(a, oks)
    ]
    assert len(known) >= 10

    res = suite.run_lesson(engine, tmp_path / "home", embedded_home / "cache", [lesson], seed=0, revision="reject")
    assert res["adapter"] and res["adapter"].startswith("learned-"), res["jobs"]
    rate = statistics.mean(lesson.follows(a) for a in res["held"][name])
    assert rate >= 5 / 6, res["held"][name]
    lost = [suite.CONTROLS[i][0] for i in known if not suite.control_ok(res["controls"][i], suite.CONTROLS[i][1])]
    # Issue 7's goal is none lost; measured with seed 0: 2 of 15. Bounded until the goal is met.
    assert len(lost) <= 2, (lost, res["controls"])


def test_a_control_is_right_when_its_answer_starts_in_the_opening():
    hamlet = (
        "The Bard's most famous work is indeed Hamlet. His masterpiece, written in 1684, is a tragedy "
        "written by the renowned English playwright William Shakespeare."
    )
    assert hamlet.lower().index("shakespeare") < suite.CONTROL_CHARS < len(hamlet)
    assert suite.control_ok(hamlet, ("shakespeare",))
    ramble = "x" * suite.CONTROL_CHARS + " Shakespeare"  # only after the opening: not an answer
    assert not suite.control_ok(ramble, ("shakespeare",))
    assert not suite.control_ok("The Bard.", ("shakespeare",))
