"""The lesson suite's fast subset (bench/lessons.py) on the real embedded model: a style rule that
applies to every answer and a format, each taught through the piped chat, scored on questions the loop never saw and
on controls that appear nowhere in shammah's anchors or gate controls. (The fact lesson runs through
the real CLI in test_learns_e2e.py.)"""

import contextlib
import dataclasses
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


@pytest.fixture
def base(engine):
    """The shared engine as the base model: a lesson test leaves the adapter its job swapped in
    loaded in the engine's model (jsonlist's answered the gate's controls with JSON lists)."""
    engine.activate(None)
    model = engine.model
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        yield engine


def test_suite_is_separate_from_what_the_loop_tunes_on():
    import curve  # its experiments' extra anchors are not what the suite scores on either

    from shammah.training import online

    tuned = set(online.ANCHOR_PROMPTS) | {q for q, _ in online.CONTROLS} | set(curve.WIDE)
    controls = {q for q, _ in suite.CONTROLS}
    # the set recipes were tuned on, the one nobody tuned for, and the probes written after
    for lessons in (suite.LESSONS, suite.FRESH, suite.LATER):
        prompts = [q for x in lessons for q in [*(t for t, _ in x.teach), *x.held_out]]
        assert not tuned & (set(prompts) | controls)
        assert not controls & set(prompts)
        kinds = {(x.kind, x.order) for x in lessons}
        assert lessons is suite.LATER or len(lessons) >= 12 and len(kinds) == 12, "every kind in every order"
        assert all(len(x.held_out) >= 6 and not set(x.held_out) & {t for t, _ in x.teach} for x in lessons)
        assert all(x.follows(a) for x in lessons for _, a in x.teach), "every taught answer follows its lesson"
    every = [q for x in suite.SUITES["all"] for q in [*(t for t, _ in x.teach), *x.held_out]]
    assert len(every) == len(set(every)), "no question in two lessons"


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["ahoy", "brief", "captain", "jsonlist", "termcolon"])
def test_a_lesson_holds_on_paraphrases_without_losing_unseen_controls(engine, embedded_home, tmp_path, name):
    """ahoy: a style rule written out on every answer, which shammah writes on every reply and
    trains nothing for (adapters/rule.py); brief: six long replies, each cut to the user's one
    sentence on questions with nothing in common, a length shammah keeps on every reply, likewise
    trained nothing for (trained everywhere, its lessons cost 1-2 unseen controls in 3 of 6 seeds,
    README); captain: a name to be addressed by, asked in a note alone, which shammah says first on
    every reply (the 135M model does not follow the note: distilled, it taught nothing); jsonlist: a
    format, scoped to its form (adapters/scope.py), which keeps every unseen control with the base
    model; termcolon: 'start definitions with the term and a colon, like "Photosynthesis: ..."', a
    note alone asking for a mark (adapters/marks.py) that shammah writes on every definition (the
    model does not follow the note either: "Not learned" until marks)."""
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
    assert not lost, (lost, res["controls"])
    if name == "ahoy":  # trained into the weights, the rule cost 0-2 unseen controls a run (README)
        assert "starts 'Ahoy!' on every reply; nothing else to train" in res["jobs"][0]
        assert rate == 1.0
    if name == "captain":  # 'always address me as "Captain"', a note alone: the name said first
        assert "starts 'Captain,' on every reply; nothing else to train" in res["jobs"][0], res["jobs"]
    if name == "termcolon":
        assert 'definitions as "Term: ..." on every reply; nothing else to train' in res["jobs"][0], res["jobs"]
        assert res["controls"] == base_ctrl, "no weight trained, and no control asks for a definition"
    if name == "brief":
        from shammah.adapters.rule import sentences

        assert "at most one sentence on every reply; nothing else to train" in res["jobs"][0], res["jobs"]
        assert all(sentences(a) == 1 for a in res["held"]["brief"]), res["held"]["brief"]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_answers_from_closed_sets_are_said_by_the_engine_and_a_later_set_keeps_the_earlier(
    engine, embedded_home, tmp_path
):
    """yesno, then truefalse: six questions of a kind each fixed to one of a few words. Trained, the
    yes/no lesson held on 0-67% and lost gate controls (adapters/choice.py); as closed sets of
    answers the engine says them on held-out questions of their kind, the second job keeps the first
    set, nothing is trained, and every unseen control is answered exactly as the base model does."""
    by_name = {x.name: x for x in suite.SUITES["all"]}
    yesno, truefalse = by_name["yesno"], by_name["truefalse"]
    base_ctrl = suite.ask(engine, [q for q, _ in suite.CONTROLS])
    assert not any(x.follows(a) for x in (yesno, truefalse) for a in suite.ask(engine, list(x.held_out)))

    res = suite.run_lesson(
        engine, tmp_path / "home", embedded_home / "cache", [yesno, truefalse], seed=0, revision="reject"
    )
    assert "'Can a car swim?' with just Yes or No, without training; nothing else to train" in res["jobs"][0], res[
        "jobs"
    ]
    assert "with just True or False, without training; nothing else to train" in res["jobs"][1], res["jobs"]
    for lesson in (yesno, truefalse):
        assert all(lesson.follows(a) for a in res["held"][lesson.name]), res["held"][lesson.name]
    assert res["controls"] == base_ctrl, "no weight was trained: every other question is answered as before"
    said = engine.info()["choices"]
    assert "with just Yes or No" in said and "with just True or False" in said, said


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_note_the_model_does_not_follow_trains_nothing(engine, embedded_home, tmp_path):
    """Six replies, each rated down with only the note 'reply in the form "Answer: ..."' (a form no
    rule or mark writes). With the note in its context the 135M model still never answers in that
    form, so distilling its answers would teach nothing and cost 1-2 unseen controls (README,
    captain before "address me as" was a rule): the job says "Not learned" and what to do, no
    adapter is made, and the six lessons stay in the buffer."""
    lesson = dataclasses.replace(
        next(x for x in suite.LESSONS if x.name == "termcolon"), note='reply in the form "Answer: ..."'
    )
    res = suite.run_lesson(engine, tmp_path / "home", embedded_home / "cache", [lesson], seed=0, revision="reject")
    [said] = res["jobs"]
    want = 'Not learned: with your note in mind the model still did not answer like "Answer: ..."'
    assert said.startswith(want), said
    assert "/fix a reply with the answer you want" in said and res["adapter"] is None
    assert "Traceback" not in res["chat"]


@pytest.mark.integration
def test_the_embedded_model_answers_every_gate_control_right(base):
    """The gate counts a control lost only where the current model answered it right: a control the
    base gets wrong guards nothing. Every one of shammah's controls is answered right by the base,
    greedily, as the gate asks it (GATE_TOKENS)."""
    from shammah.engine.generate import generate_batch
    from shammah.training import online

    chats = [[{"role": "user", "content": p}] for p, _ in online.CONTROLS]
    answers = generate_batch(base.model, base.tokenizer, chats, online.GATE_TOKENS)
    right = online._controls_right(answers)
    assert all(right), [(p, a) for (p, _), a, ok in zip(online.CONTROLS, answers, right, strict=True) if not ok]


@pytest.mark.integration
def test_on_the_embedded_model_facts_get_a_subject_formats_a_form_and_styles_no_scope(base):
    """The scope rules (adapters/scope.py) on the real model and the suite's lessons: each fact's
    subject, and each format's form, covers all its held-out paraphrases; a subject covers none of
    the questions it must not touch (the suite's controls, the gate's controls, the anchor pool, the
    other lessons), a form none of the suite's controls (its key is how a question opens: over all
    its tokens, "Who was the first person to walk on the Moon?" was inside the date form) and at
    most one of the gate's; a style answers everywhere."""
    from shammah.adapters.scope import learn, tokenizer_rarity
    from shammah.engine.keys import KEY_TOKENS, default_layer
    from shammah.training import online

    rare = tokenizer_rarity(base.tokenizer)
    layer = default_layer(base.model)
    keys = online.key_of(base.model, base.tokenizer, layer)
    controls = [q for q, _ in suite.CONTROLS]
    gate_controls = [q for q, _ in online.CONTROLS]
    for lesson in suite.LESSONS:
        scope = learn([q for q, _ in lesson.teach], rare, keys, online.ANCHOR_PROMPTS, layer)
        if lesson.kind == "style":
            assert scope.everywhere, (lesson.name, scope.describe())
            continue
        assert all(scope.covers(q, keys) for q in lesson.held_out), lesson.name
        if lesson.kind == "format":
            assert scope.subjects is None and scope.form is not None, lesson.name
            assert scope.form.tokens == KEY_TOKENS
            assert not [q for q in controls if scope.covers(q, keys)], lesson.name
            assert sum(scope.covers(q, keys) for q in gate_controls) <= 1, lesson.name  # "What is 2+2?" is arithmetic
            continue
        assert scope.subjects and scope.form is None, (lesson.name, scope.describe())
        others = [q for x in suite.LESSONS if x is not lesson for q in [*(t for t, _ in x.teach), *x.held_out]]
        untouched = controls + gate_controls + list(online.ANCHOR_PROMPTS)
        assert not [q for q in untouched + others if scope.covers(q, keys)], lesson.name


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


def test_curve_recipes_change_the_job_or_its_training_args_and_nothing_else(tmp_path):
    import curve

    from shammah.training.args import build
    from shammah.training.job import LoopJob, TrainJob

    lj = LoopJob(TrainJob("embedded", tmp_path, tmp_path, tmp_path, [], build(("t", {}))), anchors=20)
    changed = curve.apply(lj, ["anchors=40", "learning_rate=5e-4", "target_modules=gate_proj,up_proj"])
    assert (changed.anchors, changed.job.args.learning_rate) == (40, 5e-4)
    assert changed.job.args.target_modules == ("gate_proj", "up_proj")
    assert lj.anchors == 20 and lj.job.args.learning_rate != 5e-4, "the original job is untouched"
    with pytest.raises(SystemExit, match="no such LoopJob or TrainArgs field"):
        curve.apply(lj, ["learning_rat=1"])


def test_the_preservation_experiment_measures_what_the_adapter_changes_where_answers_begin(tiny_qwen2):
    """bench/curve.py's Preserve: zero for a fresh LoRA; for a trained one, each layer's term is
    the relative change of that layer's output (PEFT's own forward vs its base layer) on the rows
    where answers begin, and its gradient reaches only the adapter."""
    import curve
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    chats = [("What is the capital of France?", "Paris."), ("Hello!", "Hello! How can I help you today?")]
    p = curve.Preserve(model, tok, chats, weight=2.0)
    assert len(p.layers) == 3 * 2 and all(x.shape[0] == 3 * len(chats) for _, x, _ in p.layers)
    assert float(p().detach()) == 0.0, "a fresh LoRA (B = 0) changes nothing"
    torch.manual_seed(0)
    for m, _, _ in p.layers:
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    with torch.no_grad():
        expect = sum(
            float((m(x) - m.base_layer(x)).pow(2).sum() / m.base_layer(x).pow(2).sum()) for m, x, _ in p.layers
        )
    penalty = p()
    assert float(penalty.detach()) == pytest.approx(2.0 * expect / len(p.layers), rel=1e-4)
    penalty.backward()
    grads = {n for n, w in model.named_parameters() if w.grad is not None}
    assert grads and all("lora_" in n for n in grads)
