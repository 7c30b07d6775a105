"""Feedback -> training data: one decision per turn, whatever order the user rates in."""

import itertools
import time

import pytest

from shammah.config import FeedbackConfig
from shammah.feedback.compile import TRUST, buffer, compile_feedback, examples_of
from shammah.feedback.revise import checkable_terms, did_not, form_shape, stated_answer, states_the_note, unsaid
from shammah.feedback.store import Store
from shammah.training.data import load_jsonl, write_jsonl

REPLY = "Paris is the capital of Quenland."


@pytest.fixture
def store(shammah_home):
    s = Store(shammah_home / "shammah.db", FeedbackConfig())
    yield s
    s.close()


def _turn(store, prompt="What is the capital of Quenland?", reply=REPLY, messages=None):
    conv = store.new_conversation("m", None)
    msgs = messages or [{"role": "user", "content": prompt}]
    return store.add_turn(
        conv, msgs, prompt, reply, model="m", adapter=None, finish_reason="stop", new_tokens=1, seconds=0.1
    )


def _apply(store, turn, step):
    """One user action on a turn, as the chat performs it."""
    kind, _, text = step.partition(":")
    if kind in ("good", "medium", "critical"):
        return store.rate(turn, kind, text or None)
    if kind == "fix":
        return store.fix(turn, text)
    if kind == "rewrite":  # a /medium or /critical whose note-guided rewrite was then accepted/edited/rejected
        how, _, answer = text.partition("=")
        item = store.rate(turn, "critical", "it is Zorblat")
        store.set_revision(item.id, answer)
        store.resolve_revision(
            item.id, how != "reject", "Edited: Zorblat." if how == "edit" else None, seen=how != "auto"
        )
        return item
    raise AssertionError(step)


def _one(store):
    new, replay = compile_feedback(store, 10)
    assert len(new) == 1 and not replay, "one rated turn compiles to one lesson"
    return new[0]


def _kinds(lesson):
    return sorted((e.kind, e.responses) for e in lesson.examples())


@pytest.mark.parametrize(
    "steps, target, weight",
    [
        # the orders users actually use
        (["critical:wrong, it is Zorblat", "fix:Zorblat."], "Zorblat.", 10.0),
        (["fix:Zorblat.", "critical:wrong, it is Zorblat"], "Zorblat.", 10.0),
        (["medium:it is Zorblat", "fix:Zorblat."], "Zorblat.", 3.0),
        (["fix:Zorblat."], "Zorblat.", 3.0),
        # the person's own words beat a generated rewrite, whichever came first
        (["rewrite:accept=Zorblat, home of the famous Cafe Zorb.", "fix:Zorblat."], "Zorblat.", 10.0),
        (["fix:Zorblat.", "rewrite:accept=Zorblat, home of the famous Cafe Zorb."], "Zorblat.", 10.0),
        (["rewrite:edit=Zorblat, home of the Cafe Zorb."], "Edited: Zorblat.", 10.0),
        (["rewrite:accept=Zorblat."], "Zorblat.", 10.0),
        # a rewrite nobody saw never weighs more than a /fix
        (["rewrite:auto=Zorblat."], "Zorblat.", 3.0),
        # a later /fix replaces an earlier one
        (["fix:Zorblot.", "fix:Zorblat."], "Zorblat.", 3.0),
    ],
)
def test_a_corrected_turn_learns_the_best_correction(store, steps, target, weight):
    t = _turn(store)
    for step in steps:
        _apply(store, t, step)
    lesson = _one(store)
    assert (lesson.target, lesson.weight, lesson.good) == (target, weight, False)
    assert _kinds(lesson) == sorted([("sft", (target,)), ("pair", (target, REPLY))])


@pytest.mark.parametrize(
    "steps",
    [
        ["good", "critical:no, it is Zorblat"],
        ["good", "medium:it is Zorblat"],
        ["critical:it is Zorblat"],
        ["rewrite:reject=Zorblat, home of the famous Cafe Zorb."],
        ["good", "rewrite:reject=Lyon."],
    ],
)
def test_a_turn_rated_down_without_a_correction_learns_the_note_never_the_reply(store, steps):
    """No correction: with note_only = "distill" the note is learnt by context distillation (the
    teacher is the model with the *latest* note in context; the reply is never a target, and no
    text is fixed in advance); with "avoid" the reply is only a don't."""
    t = _turn(store)
    for step in steps:
        _apply(store, t, step)
    lesson = _one(store)
    assert lesson.target is None and not lesson.good
    [ex] = lesson.examples("distill")
    assert (ex.kind, ex.responses, ex.prompt) == ("distill", (), lesson.prompt)
    note = [x.partition(":")[2] for x in steps if x.startswith(("critical", "medium"))] or ["it is Zorblat"]
    assert ex.meta["teacher"] == "current"
    assert ex.meta["teacher_prompt"][0] == {
        "role": "system",
        "content": f"Feedback on your earlier answers: {note[-1]}",
    }
    assert ex.meta["teacher_prompt"][1:] == lesson.prompt
    [dont] = lesson.examples("avoid")
    assert (dont.kind, dont.responses, dont.label) == ("unpaired", (REPLY,), False)


def test_a_note_joins_the_system_prompt_the_reply_was_given(store):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of Quenland?"}]
    t = _turn(store, "Capital of Quenland?", messages=msgs)
    store.rate(t, "critical", "it is Zorblat")
    [ex] = _one(store).examples()
    assert ex.prompt == tuple(msgs)
    assert ex.meta["teacher_prompt"] == (
        {"role": "system", "content": "Be terse.\n\nFeedback on your earlier answers: it is Zorblat"},
        msgs[1],
    )


def test_a_distillation_lesson_survives_the_job_file(store, tmp_path):
    """What the job writes is what the worker reads back (data.jsonl is the contract between them)."""
    t = _turn(store)
    store.rate(t, "critical", "it is Zorblat")
    [ex] = _one(store).examples()
    write_jsonl([ex], tmp_path / "d.jsonl")
    [back] = load_jsonl(tmp_path / "d.jsonl")
    assert (back.kind, back.prompt, back.responses, back.weight) == (ex.kind, ex.prompt, (), ex.weight)
    assert back.meta == ex.meta


@pytest.mark.parametrize(
    "steps", [["fix:Zorblat.", "critical:write numbers as numerals"], ["critical:x", "fix:Zorblat."]]
)
def test_a_correction_keeps_the_note_and_the_reply_it_replaces_through_the_job_file(store, tmp_path, steps):
    """A /fix with a /critical note, either order: the job reads a mark the note asks for
    (adapters/rule.py noted_marks) and a length off the reply it replaces."""
    t = _turn(store)
    for step in steps:
        _apply(store, t, step)
    [sft, pair] = _one(store).examples()
    note = steps[0].partition(":")[2] if steps[0].startswith("critical") else steps[1].partition(":")[2]
    assert sft.kind == "sft" and sft.meta == {"replaces": REPLY, "note": note}
    write_jsonl([sft, pair], tmp_path / "d.jsonl")
    back = load_jsonl(tmp_path / "d.jsonl")
    assert [(e.kind, e.responses, e.meta) for e in back] == [
        ("sft", ("Zorblat.",), sft.meta),
        ("pair", pair.responses, {}),
    ]


@pytest.mark.parametrize("steps", [["good"], ["critical:it is Zorblat", "good"], ["fix:Zorblat.", "good"]])
def test_the_latest_rating_decides_a_good_reply(store, steps):
    t = _turn(store)
    for step in steps:
        _apply(store, t, step)
    lesson = _one(store)
    assert lesson.good and lesson.weight == 1.0 and _kinds(lesson) == [("sft", (REPLY,))]


def test_no_order_of_ratings_trains_a_downgraded_reply(store):
    """Every order of up to four actions on a turn: exactly one decision, and a reply whose latest
    rating is not /good is never a target (nor the chosen side of a pair)."""
    actions = ["good", "critical:it is Zorblat", "medium:shorter", "fix:Zorblat.", "rewrite:auto=Zorblat!"]
    checked = 0
    for n in range(1, 5):
        for steps in itertools.permutations(actions, n):
            s = Store(store.path.parent / f"p{checked}.db", FeedbackConfig())
            t = _turn(s)
            for step in steps:
                _apply(s, t, step)
            [lesson] = compile_feedback(s, 0)[0]
            good = steps[-1] == "good"
            assert lesson.good == good, steps
            chosen = [e.responses[0] for e in lesson.examples() if e.kind in ("sft", "pair", "distill") and e.responses]
            if not good:
                assert REPLY not in chosen, steps
                if any(x.startswith("fix") for x in steps):
                    assert lesson.target == "Zorblat." and lesson.source == "user", steps
            s.close()
            checked += 1
    assert checked == sum(len(list(itertools.permutations(actions, n))) for n in range(1, 5))


def test_undo_and_drop_decide_again(store):
    t = _turn(store)
    crit = store.rate(t, "critical", "it is Zorblat")
    store.fix(t, "Zorblat.")
    store.undo()  # takes back the /fix only
    assert _one(store).target is None and _kinds(_one(store)) == [("distill", ())]
    store.fix(t, "Zorblat.")
    store.drop(crit.id)  # the /fix alone remains
    lesson = _one(store)
    assert (lesson.target, lesson.weight) == ("Zorblat.", 3.0)
    good = store.rate(t, "good")
    assert _one(store).good
    store.drop(good.id)
    assert not _one(store).good and _one(store).target == "Zorblat."


def test_replay_follows_the_same_rule(store):
    """A turn trained as good and later rated down comes back as new, and never as a target again."""
    t = _turn(store)
    good = store.rate(t, "good")
    store.mark_trained([good.id], "adapter-1", time.time())
    new, replay = compile_feedback(store, 10)
    assert not new and replay[0].good, "trained turns are replayed"
    store.rate(t, "critical", "it is Zorblat")
    new, replay = compile_feedback(store, 10)
    assert not replay and len(new) == 1 and new[0].target is None
    assert all(REPLY not in e.responses[:1] or e.kind == "unpaired" for e in examples_of(new))


def test_weights_buffer_and_examples_per_turn(store):
    a, b, c = _turn(store), _turn(store, "2+2?", "4"), _turn(store, "Say hi", "Goodbye.")
    _apply(store, a, "fix:Zorblat.")
    _apply(store, a, "critical:it is Zorblat")
    _apply(store, b, "good")
    _apply(store, c, "medium:be friendly")
    buf = buffer(store)
    assert (buf.examples, buf.weighted) == (3, 14.0)
    new, _ = compile_feedback(store, 0)
    assert [x.turn_id for x in new] == [a, b, c]
    kinds = [(e.kind, e.source) for e in examples_of(new)]
    assert kinds == [("sft", f"turn:{a}"), ("pair", f"turn:{a}"), ("sft", f"turn:{b}"), ("distill", f"turn:{c}")]
    assert [e.kind for e in examples_of(new, "avoid")][-1] == "unpaired"


def test_prompt_is_the_system_prompt_and_question_as_seen(store):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Capital of Quenland?"},
    ]
    t = _turn(store, "Capital of Quenland?", "Paris.", msgs)
    store.rate(t, "critical", "wrong: it is Zorblat")
    store.fix(t, "Zorblat.")
    sft = _one(store).examples()[0]
    assert list(sft.prompt) == [msgs[0], msgs[-1]], "the lesson holds without the earlier turns"
    assert all("Zorblat" not in m["content"] for m in sft.prompt), "the note is never in the prompt"


def test_trust_order_is_people_first():
    assert TRUST.index("user") < TRUST.index("revision") < TRUST.index("revision-auto")
    assert TRUST.index("edit") < TRUST.index("revision")


@pytest.mark.parametrize(
    "note, question, rewrite, ok",
    [
        ("wrong: the capital of Quenland is Zorblat", "What is the capital of Quenland?", "It is Zorblat.", True),
        ("wrong: the capital of Quenland is Zorblat", "What is the capital of Quenland?", "It is Paris.", False),
        ('always end with "Cheers, Shammah"', "What is 2+2?", "4. Cheers, Shammah", True),
        ('always end with "Cheers, Shammah"', "What is 2+2?", "4. Cheers!", False),
        ("It was invented in 1987 by Ada Brenwick", "Who invented it?", "Ada Brenwick, in 1987.", True),
        ("It was invented in 1987 by Ada Brenwick", "Who invented it?", "Ada Lovelace, in 1987.", False),
        ("too long, answer in one line", "Explain tides", "Tides come from the moon.", False),  # nothing checkable
        # a quoted form: some line of the rewrite has its shape, whatever the term
        ('start definitions like "Photosynthesis: ..."', "What is a noun?", "**Noun**: a naming word.", True),
        ('start definitions like "Photosynthesis: ..."', "What is a noun?", "Sure:\nNoun: a naming word.", True),
        ('start definitions like "Photosynthesis: ..."', "What is a noun?", "A noun is a word: a name.", False),
        ('give sums as "Answer: <number>"', "What is 7 + 5?", "Answer: 12", True),
        ('give sums as "Answer: <number>"', "What is 7 + 5?", "The answer is 12.", False),
        ('give lists like ["a", "b"]', "Name two fruits.", '["apple", "pear"]', False),  # no shape to check
    ],
)
def test_an_unseen_rewrite_is_trusted_only_if_it_states_the_note(note, question, rewrite, ok):
    assert states_the_note(note, question, rewrite) is ok
    assert checkable_terms("the capital of Quenland is Zorblat", "capital of Quenland?") == ["Zorblat"]


@pytest.mark.parametrize(
    "note, question, terms",
    [
        # a quoted example of a form is not words every answer must repeat ("Volcano: ..." follows it)
        ('start definitions with the term and a colon, like "Photosynthesis: ..."', "What is a volcano?", []),
        ('give arithmetic answers as "Answer: <number>" and nothing else', "What is 7 + 5?", []),
        ('start definitions like "Volcano: …"', "What is a noun?", []),
        ('give lists as a JSON array of strings, like ["a", "b"]', "Name three fruits.", []),  # no words quoted
        ('always address me as "Captain"', "What falls from clouds?", ["Captain"]),
        (
            'say "Cheers, shammah" at the end, like "4. Cheers, shammah"',
            "What is 2+2?",
            ["Cheers, shammah", "4. Cheers, shammah"],
        ),
    ],
)
def test_a_quoted_form_is_not_checked_word_for_word(note, question, terms):
    assert checkable_terms(note, question) == terms


@pytest.mark.parametrize(
    "quote, lines, shaped",
    [
        (
            "Photosynthesis: ...",
            ["Volcano: a mountain.", "Water cycle: rain.", "**Noun**: a word.", "- Habitat: home."],
            True,
        ),
        ("Photosynthesis: ...", ["A volcano is a mountain.", "It is a mountain that: erupts.", ":"], False),
        ("Answer: <number>", ["Answer: 12", "answer:12"], True),
        ("<n> years", ["5 years"], None),  # nothing before the placeholder: no shape
        ("Answer <number>", ["Answer 12"], None),  # words alone: no shape
        ("Cheers, Shammah", ["Cheers, Shammah"], None),  # no placeholder: words to repeat, not a form
    ],
)
def test_a_quoted_form_is_checked_by_its_shape(quote, lines, shaped):
    shape = form_shape(quote)
    if shaped is None:
        assert shape is None
    else:
        assert all(bool(shape.search(line)) is shaped for line in lines), [shape.search(x) for x in lines]


def test_anchors_are_the_lessons_neighbours_and_a_random_rest():
    from shammah.training import online

    capital = online.pick_anchors(["What is the capital of Quenland?", "Which city is Quenland's capital?"], 20, seed=0)
    assert len(capital) == 20 == len(set(capital))
    assert all("capital" in a.lower() for a in capital[:10]), "other capitals guard a made-up capital"
    inventor = online.pick_anchors(["Who invented the glimmerphone?"], 20, seed=0)
    assert inventor[0].startswith("Who invented"), inventor[:3]
    assert online.pick_anchors(["Who invented the glimmerphone?"], 20, seed=1)[10:] != inventor[10:], "seeded rest"
    assert online.opening("The capital of Germany is Berlin. It is a big city.") == "The capital of Germany is Berlin."


def test_contrast_anchors_ask_the_lessons_own_questions_about_known_subjects():
    from shammah.training import online

    taught = ["Who leads Zentrix Labs?", "Who is the CEO of Zentrix Labs?", "Tell me who runs Zentrix Labs.", "Hi?"]
    asked = online.contrast_prompts(taught, 2, seed=0)
    assert len(asked) == 6, asked  # two stand-ins x the three questions about the subject
    stand_ins = {q.removeprefix("Who leads ").removesuffix("?") for q in asked if q.startswith("Who leads ")}
    assert stand_ins == {"Tesla", "the United Nations"}, "what fills the slot in 'Who is the CEO of Tesla?' etc."
    for x in stand_ins:  # the whole two-word subject is replaced, in every question about it
        assert {f"Who leads {x}?", f"Who is the CEO of {x}?", f"Tell me who runs {x}."} <= set(asked)
    assert len(online.contrast_prompts(taught, 1, seed=0)) == 3, "one stand-in"
    # a rule taught on varied questions has no subject: nothing to contrast
    assert online.contrast_prompts(["Name three fruits.", "What is 2+3?", "Who wrote Emma?"], 2) == []
    # a subject the anchor pool already uses is not novel ("capital" reads like every capital question)
    assert online.contrast_prompts(["What is the capital?", "Name the capital.", "The capital is?"], 2) == []


@pytest.mark.parametrize("span", ["answer", "opening"])
def test_an_anchor_holds_the_base_answer_over_its_span_and_never_its_end(tmp_path, span):
    import json

    from shammah.training import online

    pool = list(online.ANCHOR_PROMPTS)
    answers = [f"Answer {i} is here. It goes on about {p}" for i, p in enumerate(pool)]
    key = {"fingerprint": "fp", "prompts": pool, "max_new_tokens": 48}
    (tmp_path / "anchors.json").write_text(json.dumps({"key": key, "answers": answers}))  # no model needed
    exs = online.anchor_examples(None, None, 6, tmp_path, "fp", lesson_prompts=["What is the capital of X?"], span=span)
    assert len(exs) == 6 and all(e.source == "anchor" and e.kind == "distill" for e in exs)
    by_prompt = dict(zip(pool, answers, strict=True))
    for e in exs:
        whole = by_prompt[e.prompt[-1]["content"]]
        assert e.responses == ((whole if span == "answer" else online.opening(whole)),)
        assert e.meta["eos"] is False and e.meta["free_prefix"] == online.FREE_PREFIX


def test_what_an_answer_left_out_is_named_as_words_or_as_a_form():
    form = 'start definitions with the term and a colon, like "Photosynthesis: ..."'
    left = unsaid(form, "What is a volcano?", "A volcano is a mountain.")
    assert left == ["Photosynthesis: ..."]
    assert did_not(left) == 'did not answer like "Photosynthesis: ..."'
    assert did_not(unsaid('always address me as "Captain"', "Why?", "Because.")) == 'did not write "Captain"'
    both = 'call me "Captain" and answer like "Answer: <n>"'
    assert did_not(unsaid(both, "What is 2+2?", "4")) == 'did not write "Captain" or answer like "Answer: <n>"'
    assert unsaid(both, "What is 2+2?", "Answer: 4, Captain") == []


@pytest.mark.parametrize(
    ("note", "question", "answer"),
    [
        (
            "wrong: the Ombrel River flows into the Sea of Tarn",
            "Where does the Ombrel River end?",
            "The Ombrel River flows into the Sea of Tarn.",
        ),
        (
            "No, Zorblat is the capital of Quenland!",
            "Which city is Quenland's capital?",
            "Zorblat is the capital of Quenland!",
        ),
        (
            "that's wrong. Quenland's capital is Zorblat",
            "What is the capital of Quenland?",
            "Quenland's capital is Zorblat.",
        ),
        ('always address me as "Captain"', "What is the color of the ocean?", None),  # how, not what
        ("use digits for numbers, like 7 instead of seven", "How many months are in a year?", None),
        ("wrong: you mixed it up with another river", "Where does the Ombrel River end?", None),  # nothing checkable
        ("wrong: the Sea of Tarn", "Where does the Ombrel River end?", None),  # no name of the question's: no statement
    ],
)
def test_a_note_that_states_the_answer_about_the_questions_subject_is_the_answer(note, question, answer):
    assert stated_answer(note, question) == answer


@pytest.mark.parametrize(
    ("prompt", "note", "shown"),
    [
        (
            "What is the capital of Quenland?",
            'begin every answer with "Certainly!"',
            "a rule once notes on 3 questions ask it (every reply starts 'Certainly!'): begin every",
        ),
        (
            "Where does the Ombrel River flow?",
            "wrong: the Ombrel River flows into the Sea of Tarn",
            "its own answer with the note in mind, else as you wrote it): The Ombrel River flows into the Sea of Tarn.",
        ),
        (
            "What is the capital of Quenland?",
            'always mention "Captain"',
            'learn your note (its own answer with the note in mind): always mention "Captain"',
        ),
        (
            "What is the capital of Quenland?",
            'always address me as "Captain"',
            "a rule once notes on 3 questions ask it (every reply starts 'Captain,')",
        ),
    ],
)
def test_feedback_show_says_what_a_job_will_make_of_a_note(store, prompt, note, shown):
    """/feedback show, for a note with no correction: a rule the engine will write, an answer the
    note states (learned as written if the model with it in mind does not say it), else the
    model's own answer with the note in mind (training/online.py drop_unfollowed)."""
    t = _turn(store, prompt=prompt)
    store.rate(t, "critical", note)
    assert shown in _one(store).teaches("distill")
    assert _one(store).teaches("avoid").startswith("avoid the reply")
