"""Marks (adapters/marks.py): numbers in digits and the answer in bold, written on every reply by
the engine — found in the user's corrections or asked for in notes, taken off what the weights
learn, recorded with the adapter's rule and written the same on the stream as on a whole reply."""

import dataclasses
import json
import random

import pytest
from conftest import register_adapter

from shammah.adapters import marks
from shammah.adapters.rule import (
    Rule,
    demonstrates,
    job_rule,
    noted,
    noted_marks,
    noted_rule,
    shared_marks,
    without_rule,
)
from shammah.config import ModelConfig
from shammah.engine.engine import Engine
from shammah.engine.generate import Chunk
from shammah.training.data import Example


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("A tricycle has three wheels.", "A tricycle has 3 wheels."),
        ("There are Twelve months and fifty-two weeks.", "There are 12 months and 52 weeks."),
        ("It is two hundred and five meters, or one hundred.", "It is 205 meters, or 100."),
        ("twenty one", "21"),
        ("No one knows; one of them has one heart.", "No one knows; one of them has 1 heart."),
        ("Someone is the one who came.", "Someone is the one who came."),  # no number in it
        ("It has 4 legs.", "It has 4 legs."),
        ("Seventeen-year cicadas", "Seventeen-year cicadas"),  # a compound word is left alone
    ],
)
def test_numbers_in_words_are_written_in_digits(text, want):
    assert marks.digits(text) == want
    assert marks.digits(want) == want, "digits twice is digits once"


@pytest.mark.parametrize(
    ("question", "reply", "want"),
    [
        ("What is the capital of Italy?", "The capital of Italy is Rome. It is old.", "is **Rome**. It is old."),
        ("Which planet has rings?", "Saturn has rings.", "**Saturn** has rings."),
        ("What is the tallest animal?", "The tallest animal is the giraffe.", "the **giraffe**."),
        ("Who was the first man in space?", "Yuri Gagarin was the first man in space.", "**Yuri Gagarin** was"),
        ("What is the largest mammal?", "The largest mammal is the blue whale, by far.", "the **blue whale**, by"),
        ("Which country is biggest?", "The United States of America is big.", "The **United States of America** is"),
        # a name first: the capital says which word is the answer
        ("What is the hardest substance?", "Natural diamond, from Brazil, is hardest.", "from **Brazil**"),
    ],
)
def test_the_answer_the_question_asks_for_is_put_in_bold(question, reply, want):
    out = marks.bold(reply, question)
    assert want in out and out.count("**") == 2, out
    assert marks.unbold(out) == reply
    assert marks.bold(out, question) == out, "bold the model wrote is kept as it is"


def test_a_reply_that_only_repeats_the_question_is_not_bold():
    assert marks.bold("The capital of Italy is it.", "What is the capital of Italy?") == "The capital of Italy is it."
    assert marks.bold("", "Why?") == ""


@pytest.mark.parametrize(
    ("question", "reply", "want"),
    [
        ("What is a verb?", "A verb is a word for an action.", "Verb: a word for an action."),
        ("What is photosynthesis?", "Photosynthesis is how plants eat.", "Photosynthesis: how plants eat."),
        ("What are nouns?", "Nouns are words for things.", "Nouns: words for things."),
        ("What is an island?", "It is land surrounded by water.", "Island: land surrounded by water."),
        ("Define friction.", "Friction is a force.", "Friction: a force."),
        ("What does habitat mean?", "A home for animals.", "Habitat: A home for animals."),
        ("What is erosion?", "Erosion: wearing away.", "Erosion: wearing away."),  # its own
        # no definition asked for: a fact about something, a sum, a name of the asker's
        ("What is the capital of China?", "Beijing.", "Beijing."),
        ("What is 7 + 5?", "12.", "12."),
        ("What is your name?", "Shammah.", "Shammah."),
        ("Why is the sky blue?", "Light scatters.", "Light scatters."),
    ],
)
def test_a_definition_opens_with_its_term_and_a_colon(question, reply, want):
    assert marks.term(reply, question) == want
    assert marks.term(want, question) == want


@pytest.mark.parametrize(
    ("note", "want"),
    [
        ("use digits for numbers, like 7 instead of seven", ("digits",)),
        ("write numbers as numerals please", ("digits",)),
        ("spell out numbers in words, not digits", ()),
        ("wrong format: put the answer in bold, like **Paris**", ("bold",)),
        ("bold the answer and use digits for numbers", ("digits", "bold")),
        ("don't use bold", ()),
        ("too long: answer in one short sentence", ()),
        ("the figures are wrong", ()),  # no number asked for in digits
        ('start definitions with the term and a colon, like "Photosynthesis: ..."', ("term",)),
        ("definitions should begin with the term followed by a colon", ("term",)),
        ('give arithmetic answers as "Answer: <number>"', ()),  # a form, but no definition's
    ],
)
def test_a_note_that_asks_for_a_mark_is_read(note, want):
    assert marks.noted(note) == want
    assert noted(note) == (Rule(marks=want) if want else None)


def _fixes(*turns):
    """Corrections as the chat compiles them: the user's answer, the reply it replaces."""
    return [
        Example("sft", ({"role": "user", "content": q},), (a,), weight=3.0, meta={"replaces": r}) for q, a, r in turns
    ]


BOLD = _fixes(
    ("What is the capital of Italy?", "The capital of Italy is **Rome**.", "Rome is the capital of Italy."),
    ("Which planet is red?", "**Mars** is the red planet.", "The red planet is Mars."),
    ("What metal is liquid?", "**Mercury** is liquid.", "Mercury."),
    ("What is the closest star?", "The closest star is **the Sun**.", "It is the Sun."),
)
DIGITS = _fixes(
    ("How many months in a year?", "There are 12 months in a year.", "There are twelve months in a year."),
    ("How many wheels on a tricycle?", "A tricycle has 3 wheels.", "A tricycle has three wheels, one in front."),
    ("How many legs on a tripod?", "A tripod has 3 legs.", "A tripod has three legs."),
)


def test_marks_every_correction_shows_are_found_and_others_are_not():
    assert shared_marks(BOLD) == ("bold",)
    assert shared_marks(DIGITS) == ("digits",)
    assert shared_marks(BOLD[:2]) == (), "two questions are no mark"
    assert shared_marks(BOLD + DIGITS) == ("digits",), "answers without bold: bold is not what the user meant"
    asked = _fixes(
        ("What is the capital of Italy?", "The capital of **Italy** is Rome.", "Rome."),
        ("Which planet is red?", "The **red** planet is Mars.", "Mars."),
        ("What metal is liquid?", "The **liquid** metal is mercury.", "Mercury."),
    )
    assert shared_marks(asked) == (), "bold around a word of the question is no answer"
    # a fact corrected with a number is no lesson in digits: the number is new, not the reply's in digits
    fact = _fixes(
        ("How long is the bridge?", "It is 412 meters long.", "It is two kilometers long."),
        ("Length of the bridge?", "412 meters.", "About three hundred meters."),
        ("The bridge spans?", "The bridge spans 412 meters.", "It spans one mile."),
    )
    assert shared_marks(fact) == ()
    answer = _fixes(
        ("What is 7 + 5?", "Answer: 12", "The sum of seven and five is twelve."),
        ("What is 9 - 4?", "Answer: 5", "Nine minus four is five."),
        ("What is 6 * 3?", "Answer: 18", "Six times three makes eighteen."),
    )
    assert shared_marks(answer) == (), "a form of its own, not the replies in digits: trained (answercolon)"
    words = DIGITS + _fixes(("How many eyes?", "Two eyes.", "Two eyes."))
    assert shared_marks(words) == (), "an answer that still says a number in words"
    terms = _fixes(
        ("What is a noun?", "Noun: a word for a thing.", "A noun is a word."),
        ("What is a volcano?", "Volcano: a mountain that erupts.", "It is a mountain."),
        ("What is democracy?", "Democracy: rule by the people.", "Rule by the people."),
        ("Who wrote Hamlet?", "Shakespeare.", "Marlowe."),  # no definition asked: no answer against it
    )
    assert shared_marks(terms) == ("term",)
    assert shared_marks(terms + _fixes(("What is a habitat?", "A home.", "A place."))) == (), "one without it"


def test_a_mark_notes_ask_for_beside_corrections_is_found_where_no_correction_goes_against_it():
    """bench/lessons.py --suite later, numerals (fix+critical, 'write numbers as numerals'): the 135M
    model got most numbers wrong ("An ant has 18 legs."), so the fixes told new numbers rather than
    the replies' in digits: no mark shown (83% x3, trained); the notes beside them ask for it."""
    told = [
        dataclasses.replace(e, meta={**e.meta, "note": "write numbers as numerals"})
        for e in _fixes(
            ("How many legs does an ant have?", "An ant has 6 legs.", "An ant has eighteen legs."),
            ("How many days in a fortnight?", "There are 14 days.", "It is 1440 days."),
            ("How many wings does a butterfly have?", "A butterfly has 4 wings.", "Two wings."),
        )
    ]
    assert shared_marks(told) == () and noted_marks(told) == ("digits",)
    assert job_rule(told, None, told) == Rule(marks=("digits",))
    assert noted_marks(told[:2]) == (), "notes on two questions"
    worded = told + _fixes(("How many eyes?", "Two eyes.", "Three."))
    assert noted_marks(worded) == (), "a correction that says a number in words goes against it"
    rare = lambda w: False  # noqa: E731
    assert not any(demonstrates(e, Rule(marks=("digits",)), rare) for e in told), "new numbers: trained as facts"


def test_a_mark_learned_is_the_jobs_and_lessons_that_only_show_it_are_not_trained():
    rule = job_rule(BOLD, None, BOLD)
    assert rule == Rule(marks=("bold",)) and rule.describe() == "the answer in bold"
    rare = lambda w: False  # noqa: E731
    assert all(demonstrates(e, rule, rare) for e in BOLD), "each fix says what the reply said, in bold"
    told = _fixes(("What is the capital of Quenland?", "It is **Zorblat**.", "It is Paris."))[0]
    assert not demonstrates(told, rule, lambda w: w == "quenland"), "a new name in bold about a subject: trained"
    [trained] = without_rule(rule, [told])
    assert trained.responses == ("It is Zorblat.",), "the weights learn it without the bold"
    # about no subject, it would be trained everywhere and leak: the correction is the mark's
    italy = _fixes(("What is the capital of Italy?", "It is **Rome**.", "Il Coriobella, Italy."))[0]
    assert demonstrates(italy, rule, rare)
    plain = _fixes(("What is the capital of Italy?", "It is Rome.", "Il Coriobella, Italy."))[0]
    assert not demonstrates(plain, rule, rare), "without the mark it is a fact, trained as before"
    # digits: the corrections say the replies' numbers in digits, nothing new
    rule = job_rule(DIGITS, Rule("Ahoy! "), DIGITS)
    assert rule == Rule("Ahoy! ", marks=("digits",)), "a parent's opening stays beside a new mark"
    assert all(demonstrates(e, rule, rare) for e in DIGITS)
    # a note-only lesson that asks for a mark shows only it
    asked = [
        Example("distill", ({"role": "user", "content": q},), (), meta={"note": "use digits for numbers"})
        for q in ("How many seasons?", "How many toes?", "How many sides?")
    ]
    assert noted_rule(asked) == Rule(marks=("digits",)) == job_rule(asked, None, asked)
    assert all(demonstrates(e, Rule(marks=("digits",)), rare) for e in asked)
    assert not demonstrates(asked[0], Rule("Ahoy! "), rare), "a rule the note does not ask for"
    [states] = [
        Example(
            "distill",
            ({"role": "user", "content": "How long is the Marrowby Bridge?"},),
            (),
            meta={"note": "wrong: the Marrowby Bridge is 412 meters long, use digits for numbers"},
        )
    ]
    assert not demonstrates(states, Rule(marks=("digits",)), rare), "a note that also states the answer is trained"
    # marks stay with the adapters trained after it
    assert job_rule(BOLD, Rule(marks=("digits",)), BOLD).marks == ("digits", "bold")


def test_only_known_marks_are_recorded_and_read():
    rule = Rule("Ahoy! ", "", 0, ("digits", "bold"))
    assert rule.record() == ["Ahoy! ", "", 0, ["digits", "bold"]]
    assert Rule.recorded(rule.record()) == rule
    assert Rule.recorded(["", "", 0, ["bold"]]) == Rule(marks=("bold",))
    for bad in (["", "", 0, ["italic"]], ["", "", 0, "bold"], ["", "", 0, []], ["", "", 0, [1]]):
        assert Rule.recorded(bad) is None, bad
    assert Rule("", "", 1).record() == ["", "", 1], "a rule without marks is recorded as before"


def _chunks(pieces, reason="stop"):
    return [Chunk(t, (i,)) for i, t in enumerate(pieces[:-1])] + [Chunk(pieces[-1], (), reason, len(pieces), 0.1)]


def _split(text, rnd):
    cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(1, 8))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize(
    "rule",
    [
        Rule(marks=("digits",)),
        Rule(marks=("bold",)),
        Rule(marks=("term",)),
        Rule(marks=("digits", "term", "bold")),
        Rule("Well, ", "Bye.", 0, ("digits", "bold")),
    ],
)
def test_the_stream_is_marked_as_the_whole_reply_is(rule):
    """However the model's text falls into chunks, the stream says what Rule.apply says of the whole
    reply, on the same chunks (their token ids and finish reasons as they were)."""
    rnd = random.Random(0)
    replies = [
        ("How many legs does a horse have?", "A horse has four legs. Some have twenty-one spots and one of them."),
        ("Which planet has rings?", "Saturn has rings. It has eighty moons"),
        ("What is the tallest animal?", "The tallest animal is the giraffe"),
        ("How many?", "Twenty"),
        ("What is a habitat?", "A habitat is the home of one animal. It has two trees."),
        ("Why?", "Because.\n\nSeven hundred and two reasons: one, two."),
    ]
    for question, text in replies:
        for _ in range(20):
            pieces = _split(text, rnd)
            out = list(rule.stream(_chunks(pieces), question))
            assert "".join(c.text for c in out) == rule.apply(text, question), pieces
            assert [(c.token_ids, c.finish_reason) for c in out] == [
                (c.token_ids, c.finish_reason) for c in _chunks(pieces)
            ]


def test_an_interrupted_reply_is_written_as_far_as_it_went():
    out = list(Rule(marks=("digits", "bold")).stream(_chunks(["Saturn has", " three"], "interrupted"), "Which planet?"))
    assert "".join(c.text for c in out) == "Saturn has 3", "no bold on a first sentence that never ended"


def test_the_active_adapters_marks_are_on_every_reply(tiny_qwen2, shammah_home, tmp_path, monkeypatch):
    """A real engine on the tiny Qwen2: an adapter recording marks writes them on its replies,
    streamed and batched, each marked for the question it answers (the newest user message); the
    base model's replies are not marked."""
    recs = [{"prompt": "Say something.", "completion": "one two three four five six."}] * 2
    marked = register_adapter(tiny_qwen2, shammah_home, "marked", recs)
    meta = json.loads((marked.path / "shammah.json").read_text())
    (marked.path / "shammah.json").write_text(json.dumps({**meta, "rule": ["", "", 0, ["digits", "bold"]]}))
    e = Engine(ModelConfig(base=str(tiny_qwen2), temperature=0.0, max_new_tokens=12), tmp_path).load()
    asked = []
    real_bold = marks.bold
    monkeypatch.setattr(marks, "bold", lambda text, question: asked.append(question) or real_bold(text, question))
    chat = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Say something."},
    ]
    e.activate("marked", marked.path, marked.get("base", "fingerprint"))
    rule = e.rule
    assert rule == Rule(marks=("digits", "bold"))
    assert e.info()["rule"] == "numbers in digits, the answer in bold (every reply)"
    e.rule = None  # what the adapter's weights say, unmarked
    raw = e.reply(chat)
    assert asked == []
    e.rule = rule
    assert e.reply(chat).strip() == rule.apply(raw, "Say something.") == e.answers([chat], 12)[0]
    assert asked == ["Say something."] * 3, "the stream, apply and a batch each mark the reply to the newest question"
    e.activate(None)
    e.reply(chat), e.answers([chat], 12)
    assert len(asked) == 3 and e.rule is None, "the base model's replies are not marked"
