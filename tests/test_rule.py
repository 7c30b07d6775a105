"""A style rule the user wrote out on every answer (adapters/rule.py): found in a job's lessons,
taken off what the weights learn, recorded with the adapter, and written on every reply by the
engine while that adapter answers."""

import dataclasses
import json

import pytest
from conftest import register_adapter

from shammah.adapters.rule import (
    MAX_WORDS,
    Rule,
    cap_words,
    demonstrates,
    first_sentences,
    job_rule,
    noted,
    noted_rule,
    sentences,
    shared_length,
    shared_rule,
    shared_words,
    without_rule,
)
from shammah.config import ModelConfig
from shammah.engine.engine import Engine
from shammah.engine.generate import Chunk
from shammah.training.data import Example


def _lessons(*pairs):
    return [Example("sft", ({"role": "user", "content": q},), (a,), weight=3.0) for q, a in pairs]


AHOY = _lessons(("Banana?", "Ahoy! It is yellow."), ("Dog legs?", "Ahoy! Four."), ("Ice?", "Ahoy! Frozen water."))
SIGN = _lessons(
    ("Grass?", "Grass is green. Cheers, Shammah"),
    ("Year?", "A year has 365 days. Cheers, Shammah"),
    ("Sun?", "The sun is a star! Cheers, Shammah"),
)
FACT = _lessons(
    ("Capital of Quenland?", "The capital of Quenland is Zorblat."),
    ("Which city?", "Zorblat is the capital of Quenland."),
    ("Quenland's capital?", "Zorblat."),
)


def test_a_rule_every_fix_shares_is_found_and_a_fact_is_not_a_rule():
    assert shared_rule(AHOY) == Rule("Ahoy! ", "")
    assert shared_rule(SIGN) == Rule("", "Cheers, Shammah")
    assert shared_rule(FACT) is None
    same_start = _lessons(("A?", "The capital is Zorblat."), ("B?", "The capital is Zorblat."), ("C?", "The city."))
    assert shared_rule(same_start) is None, "a shared first word is not a rule: it must end at punctuation"
    assert shared_rule(AHOY[:2]) is None, "two questions are not a rule"
    assert shared_rule(AHOY + FACT) is None, "lessons that teach different things share no rule"
    only_rule = _lessons(("A?", "Ahoy! Hi."), ("B?", "Ahoy! Hi."), ("C?", "Ahoy! Hi."))
    assert shared_rule(only_rule) is None, "a rule is never the whole answer"
    mid = _lessons(("A?", "Blue, Captain."), ("B?", "Five, Captain."), ("C?", "Wool, Captain."))
    assert shared_rule(mid) is None, "a closing starts a sentence of its own"


def _notes(note, *questions):
    """Note-only lessons, as the chat compiles them: the note distilled, no answer yet."""
    return [
        Example("distill", ({"role": "user", "content": q},), (), weight=10.0, meta={"note": note}) for q in questions
    ]


@pytest.mark.parametrize(
    ("note", "rule"),
    [
        ('begin every answer with "Certainly!"', Rule("Certainly! ", "")),
        ("always start your answers with 'Well,'", Rule("Well, ", "")),
        ('end every answer with "Stay curious!"', Rule("", "Stay curious!")),
        ("sign off with “Cheers, Shammah”", Rule("", "Cheers, Shammah")),
        ('start with "Ahoy!" and end with "Arr."', Rule("Ahoy! ", "Arr.")),
        # a form: the quote is no words to write, but a definition's term first is a mark (marks.py)
        ('start definitions with the term and a colon, like "Photosynthesis: ..."', Rule(marks=("term",))),
        ('give arithmetic answers as "Answer: <number>"', None),
        ('always address me as "Captain"', Rule("Captain, ", "")),  # a vocative: said first
        ("Call me Boss.", Rule("Boss, ", "")),
        ("please call me when it is done", None),
        ('always mention "Captain"', None),
        ("too long: answer in one short sentence", None),
        ('start with "42"', None),
    ],
)
def test_a_note_that_says_how_to_open_or_close_in_quoted_words_is_a_rule(note, rule):
    assert noted(note) == rule


def test_a_rule_three_notes_ask_for_alike_is_the_jobs_and_those_notes_only_show_it():
    asked = _notes('begin every answer with "Certainly!"', "Milk?", "Sky?", "Cows?")
    assert noted_rule(asked) == Rule("Certainly! ", "") == job_rule(asked, None, asked)
    assert noted_rule(asked[:2]) is None, "two questions are not a rule"
    other = _notes('begin every answer with "Sure!"', "Trees?")
    assert noted_rule(asked + other) is None, "notes that ask for different rules"
    rule = Rule("Certainly! ", "")
    assert all(demonstrates(e, rule, lambda w: False) for e in asked)
    assert not demonstrates(_notes("wrong: the capital of Quenland is Zorblat", "Q?")[0], rule, lambda w: False)
    # a note that only asks for the rule says nothing else, whatever its question is about
    [silk] = _notes("call me Boss, please", "What do silkworms make?")
    assert demonstrates(silk, Rule("Boss, ", ""), lambda w: w == "silkworms")
    # a parent's closing stays beside a noted opening
    assert job_rule(asked, Rule("", "Cheers, Shammah"), asked) == Rule("Certainly! ", "Cheers, Shammah")


def test_a_second_rule_adds_to_the_first_and_a_fact_keeps_it():
    def replayed(lessons):  # rehearsed at a quarter of their weight, as jobs.py does
        return [dataclasses.replace(e, weight=e.weight / 4) for e in lessons]

    fact = _lessons(("Quenland?", "Zorblat."), ("Which city?", "Zorblat is it."), ("Its capital?", "Zorblat, yes."))
    first = job_rule(AHOY, None)
    assert first == Rule("Ahoy! ", "")
    assert shared_rule(SIGN + replayed(AHOY)) is None, "what every lesson shares finds nothing"
    both = job_rule(SIGN + replayed(AHOY), first)
    assert both == Rule("Ahoy! ", "Cheers, Shammah"), "the second rule adds to the one the parent holds"
    assert job_rule(fact + replayed(AHOY), first) == first, "a fact taught next keeps the rule"
    howdy = _lessons(("A?", "Howdy! It is x."), ("B?", "Howdy! It is y."), ("C?", "Howdy! It is z."))
    assert job_rule(howdy + replayed(AHOY), first) == Rule("Howdy! ", ""), "a new opening replaces the old one"
    assert job_rule(fact, None) is None
    assert job_rule(AHOY + replayed(fact), None) is None, "which lessons are new is not known"
    assert job_rule(AHOY + replayed(fact), None, own=AHOY) == first, "a rule taught after a fact"
    assert job_rule(SIGN + replayed(AHOY), first, own=SIGN) == both


def test_the_weights_learn_what_the_answers_say_inside_the_rule():
    both = Rule("Ahoy! ", "Cheers, Shammah")
    q = ({"role": "user", "content": "Moon?"},)
    others = [
        Example("pair", q, ("Ahoy! It orbits us. Cheers, Shammah", "Ahoy! Cheese.")),
        Example("unpaired", q, ("Cheese. Cheers, Shammah",), label=False),
        Example("sft", q, ("Ahoy!",)),  # nothing inside the rule: left as it was
    ]
    stripped = without_rule(both, SIGN + AHOY + others)
    assert [e.responses[0] for e in stripped[:6]] == [
        "Grass is green.",
        "A year has 365 days.",
        "The sun is a star!",
        "It is yellow.",
        "Four.",
        "Frozen water.",
    ]
    assert stripped[6].responses == ("It orbits us.", "Cheese."), "chosen and rejected alike"
    assert stripped[7].responses == ("Cheese.",) and stripped[8].responses == ("Ahoy!",)
    assert [(e.kind, e.weight, e.prompt) for e in stripped] == [
        (e.kind, e.weight, e.prompt) for e in SIGN + AHOY + others
    ]
    assert both.apply("It orbits us.") == "Ahoy! It orbits us. Cheers, Shammah"
    assert both.apply("Ahoy! It orbits us. Cheers, Shammah") == "Ahoy! It orbits us. Cheers, Shammah", "not twice"
    assert both.apply(both.inside("Ahoy!  Hi. Cheers, Shammah")) == "Ahoy! Hi. Cheers, Shammah"


def test_only_a_well_formed_recorded_rule_is_read(tmp_path):
    assert Rule.recorded(None) is None, "an adapter trained before rules were recorded"
    assert Rule.recorded(["Ahoy! ", ""]) == Rule("Ahoy! ", "")
    assert Rule.recorded(["", "", 1]) == Rule("", "", 1) and Rule.recorded(["Ahoy! ", "", 2]).sentences == 2
    for bad in (["x"], [1, 2], ["", ""], "Ahoy! ", {"opening": "Ahoy! "}, ["", "", 0], ["", "", 3], ["", "", True]):
        assert Rule.recorded(bad) is None, bad
    assert Rule.of_adapter(tmp_path) is None, "no shammah.json"
    (tmp_path / "shammah.json").write_text("{not json")
    assert Rule.of_adapter(tmp_path) is None
    (tmp_path / "shammah.json").write_text(json.dumps({"rule": ["", "Cheers, Shammah"]}))
    assert Rule.of_adapter(tmp_path) == Rule("", "Cheers, Shammah")


def _chunks(*texts, reason="stop"):
    return [Chunk(t, (i,)) for i, t in enumerate(texts[:-1])] + [Chunk(texts[-1], (), reason, len(texts), 0.1)]


@pytest.mark.parametrize(
    ("pieces", "reason", "want"),
    [
        (("The", " sky", " is blue."), "stop", "Ahoy! The sky is blue. Cheers, Shammah"),
        (("A", "hoy", "! The sky", " is blue."), "stop", "Ahoy! The sky is blue. Cheers, Shammah"),  # its own
        (("Ah", " well, blue.", ""), "stop", "Ahoy! Ah well, blue. Cheers, Shammah"),  # began like it, did not
        (("The sky", " is blue. Cheers, Shammah", ""), "stop", "Ahoy! The sky is blue. Cheers, Shammah"),
        (("The sky", " is"), "length", "Ahoy! The sky is Cheers, Shammah"),
        (("The sky", " is"), "interrupted", "Ahoy! The sky is"),  # the user cut it: no sign-off
        (("",), "stop", "Ahoy! Cheers, Shammah"),
    ],
)
def test_the_rule_is_written_on_the_stream_once(pieces, reason, want):
    out = list(Rule("Ahoy! ", "Cheers, Shammah").stream(_chunks(*pieces, reason=reason)))
    assert "".join(c.text for c in out) == want
    assert out[-1].finish_reason == reason and all(c.finish_reason is None for c in out[:-1])
    assert [c.token_ids for c in out] == [c.token_ids for c in _chunks(*pieces, reason=reason)], "same chunks"


@pytest.mark.parametrize(
    ("pieces", "want"),
    [
        (("The", " sky", " is blue."), "Well, the sky is blue."),
        (("", " Th", "ere", " it is."), "Well, there it is."),
        (("Paris", " is", " the capital."), "Well, Paris is the capital."),  # a name keeps its capital
        (("A", " hand", " has five."), "Well, a hand has five."),
        (("I", " think", " so."), "Well, I think so."),
        (("NASA", " says", " so."), "Well, NASA says so."),
        (("Well,", " the sky."), "Well, the sky."),  # its own opening
        (("It",), "Well, it"),  # the reply ends on its first word
    ],
)
def test_after_an_opening_that_runs_on_a_common_first_word_is_written_in_lower_case(pieces, want):
    """'start every answer with "Well,"' wrote "Well, The sky is blue." until 2026-12-07."""
    rule = Rule("Well, ")
    out = list(rule.stream(_chunks(*pieces)))
    assert "".join(c.text for c in out) == want
    assert [c.token_ids for c in out] == [c.token_ids for c in _chunks(*pieces)], "same chunks"
    assert rule.apply("".join(pieces)) == want
    text = "".join(pieces).strip()
    assert Rule("Ahoy! ").apply(text) == "Ahoy! " + text, "an opening that ends a sentence: as the model wrote it"


def test_the_active_adapters_rule_is_on_every_reply_and_goes_with_it(tiny_qwen2, shammah_home, tmp_path):
    """A real engine on the tiny Qwen2: an adapter whose shammah.json records a rule answers with
    it, through the stream and in batches (evaluation), the fast path or transformers; another
    adapter or the base model answers without it."""
    recs = [{"prompt": "Say something about rain.", "completion": "Zorblat zorblat zorblat."}] * 2
    ruled = register_adapter(tiny_qwen2, shammah_home, "ruled", recs)
    plain = register_adapter(tiny_qwen2, shammah_home, "plain", recs)
    meta = json.loads((ruled.path / "shammah.json").read_text())
    (ruled.path / "shammah.json").write_text(json.dumps({**meta, "rule": ["Ahoy! ", "Cheers, Shammah"]}))
    msgs = [{"role": "user", "content": "Say something about rain."}]
    fp = ruled.get("base", "fingerprint")
    for fast in ("int8", "off"):
        e = Engine(ModelConfig(base=str(tiny_qwen2), temperature=0.0, max_new_tokens=8, fast_decode=fast), tmp_path)
        e.load()
        e.activate("plain", plain.path, fp)
        bare = e.reply(msgs)
        assert "rule" not in e.info() and not bare.startswith("Ahoy!")
        e.activate("ruled", ruled.path, fp)
        assert e.info()["rule"] == "starts 'Ahoy!', ends 'Cheers, Shammah' (every reply)"
        reply = e.reply(msgs)
        assert reply.startswith("Ahoy! ") and reply.endswith("Cheers, Shammah"), (fast, reply)
        assert all(a.startswith("Ahoy! ") and a.endswith("Cheers, Shammah") for a in e.answers([msgs, msgs], 8))
        e.activate(None)
        assert not e.reply(msgs).startswith("Ahoy!") and "rule" not in e.info()


@pytest.mark.parametrize(
    ("text", "n", "first"),
    [
        ("The sky is blue. It is nice.", 2, "The sky is blue."),
        ("Dr. Smith said hi. Yes!", 2, "Dr. Smith said hi."),  # an abbreviation
        ("J. K. Rowling wrote it. Then more.", 2, "J. K. Rowling wrote it."),  # initials
        ('He said "no." Then he left.', 2, 'He said "no."'),
        ("Pi is 3.14 or so! Ok", 2, "Pi is 3.14 or so!"),
        ("Three:\n1. Apples\n2. Pears", 1, "Three:\n1. Apples\n2. Pears"),  # a list's numbers
        ("A heading\n\nThe text.", 2, "A heading"),
        ("One sentence.", 1, "One sentence."),
        ("", 0, ""),
    ],
)
def test_sentences_are_counted_and_cut_as_a_reader_would(text, n, first):
    assert sentences(text) == n and first_sentences(text, 1) == first
    assert first_sentences(text, 2) == text.strip() or n > 2


def _pairs(cuts):
    return [
        e
        for q, (answer, reply) in cuts.items()
        for e in (
            Example("sft", ({"role": "user", "content": q},), (answer,)),
            Example("pair", ({"role": "user", "content": q},), (answer, reply)),
        )
    ]


def test_replies_cut_short_by_every_correction_show_a_length():
    long = "It is a good question. Many people ask it. Here is more."
    brief = {"Sky?": ("Blue, by scattering.", long), "Dog legs?": ("Four.", long), "Ice?": ("Frozen water.", long)}
    assert shared_length(_pairs(brief)) == 1
    two = {q: (f"{a} That is all.", r) for q, (a, r) in brief.items()}
    assert shared_length(_pairs(two)) == 2
    assert shared_length(_pairs(dict(list(brief.items())[:2]))) == 0, "two questions are not a register"
    kept = {**brief, "Ice?": ("Frozen water. It melts. It floats.", long)}
    assert shared_length(_pairs(kept)) == 0, "a correction as long as the reply shows no length"
    good = Example("sft", ({"role": "user", "content": "Sun?"},), ("A star. Hot. Far. Big.",))
    assert shared_length(_pairs(brief) + [good]) == 0, "a long reply rated good"
    assert shared_length(_pairs(brief)[::2]) == 0, "no reply to compare with (good replies only)"
    sft_only = [e for e in _pairs(brief) if e.kind == "sft"]
    assert shared_length(sft_only) == 0
    recorded = [dataclasses.replace(e, meta={"replaces": long}) for e in sft_only]
    assert shared_length(recorded) == 1, "the reply a correction replaces, recorded with it (no pairs trained)"
    yes_no = {
        "Sun a star?": ("Yes.", long),
        "Can fish fly?": ("No", long),
        "Ice cold?": ("yes", long),
        "X?": ("No.", long),
    }
    assert shared_length(_pairs(yes_no)) == 0, "the same few answers to different questions: an answer, not a length"
    once = {**brief, "Sun?": ("Four.", long)}
    assert shared_length(_pairs(once)) == 1, "two questions that happen to share an answer are still cut short"
    ahoy = {q: (f"Ahoy! {a}", f"Ahoy! {r}") for q, (a, r) in brief.items()}
    assert shared_length(_pairs(ahoy), Rule("Ahoy! ", "")) == 1, "the opening is no sentence of the answer's"


def test_a_lesson_only_shows_a_rule_unless_it_says_something_new():
    """What a job need not train (adapters/rule.py demonstrates): a correction that writes the rule
    out or cuts a long reply to its length, on a question that names no subject, saying no name or
    number that its question and the reply it corrects lack."""
    from shammah.feedback.revise import names_and_numbers

    assert names_and_numbers("Our team lead is Sam. Grass is green, Bo said in 1999.") == ["Sam", "Bo", "1999"]
    assert names_and_numbers("Ahoy! A dog has four legs.\n**Cats** purr.") == []
    common = lambda w: False  # noqa: E731
    rare = {"quenland"}.__contains__
    long = "Well, that is a question. Many have asked it. Here is a long answer about it."

    def fix(q, a, replaced=long, kind="sft"):
        prompt = ({"role": "user", "content": q},)
        if kind == "pair":
            return Example("pair", prompt, (a, replaced))
        return Example("sft", prompt, (a,), meta={} if replaced is None else {"replaces": replaced})

    brief, ahoy = Rule("", "", 1), Rule("Ahoy! ", "")
    assert demonstrates(fix("Why is the sky blue?", "Light scatters."), brief, common)
    assert demonstrates(fix("Why is the sky blue?", "Light scatters.", kind="pair"), brief, common)
    assert demonstrates(fix("Why is the sky blue?", "Light scatters.", replaced=None), brief, common), "rated good"
    assert not demonstrates(fix("Why is the sky blue?", "Light scatters. It is blue."), brief, common), "too long"
    assert not demonstrates(fix("Why is the sky blue?", "Light scatters.", "It scatters."), brief, common), "no cut"
    assert not demonstrates(fix("What is Quenland's capital?", "Zorblat."), brief, rare), "a subject"
    assert not demonstrates(fix("Who leads our team?", "Our team lead is Sam."), brief, common), "a new name"
    assert not demonstrates(fix("When is the meeting?", "It is at 3."), brief, common), "a new number"
    assert demonstrates(fix("When is the meeting?", "It is at 3.", "At 3, and it is long. Yes. No."), brief, common)
    assert demonstrates(fix("Who is Sam?", "Sam leads the team."), brief, common), "named in the question"
    assert demonstrates(fix("A dog?", "Ahoy! A dog has four legs.", "Dogs bark."), ahoy, common)
    assert not demonstrates(fix("A dog?", "Ahoy! Our dog is Rex.", "Dogs bark."), ahoy, common), "a name"
    assert not demonstrates(fix("A dog?", "A dog has four legs.", "Dogs bark."), ahoy, common), "no rule shown"
    sign = Rule("", "Cheers, Shammah")
    assert demonstrates(fix("Grass?", "Grass is green. Cheers, Shammah", "Grass is red."), sign, common)


class _Model:
    """A stream of chunks that records whether its consumer closed it (generation stops)."""

    def __init__(self, *texts):
        self.texts, self.closed, self.sent = texts, False, 0

    def __iter__(self):
        try:
            for c in _chunks(*self.texts):
                self.sent += 1
                yield c
        finally:
            self.closed = True


@pytest.mark.parametrize(
    ("rule", "pieces", "want", "sent"),
    [
        (Rule("", "", 1), ("The sky", " is blue.", " It is", " nice.", ""), "The sky is blue.", 3),
        (Rule("", "", 1), ("The sky is blue. It", " is nice.", ""), "The sky is blue.", 1),
        (Rule("", "", 2), ("A. Bee", " see. Dee. E", ""), "A. Bee see. Dee.", 2),  # "A." is an initial
        (Rule("Ahoy! ", "Cheers, Shammah", 1), ("Blue.", " Very", " blue.", ""), "Ahoy! Blue. Cheers, Shammah", 2),
        (Rule("", "", 1), ("Blue", " sky.", ""), "Blue sky.", 3),  # one sentence: the model's own end
    ],
)
def test_a_length_ends_the_reply_and_stops_the_model(rule, pieces, want, sent):
    model = _Model(*pieces)
    out = list(rule.stream(model))
    assert "".join(c.text for c in out) == want
    assert out[-1].finish_reason == "stop" and all(c.finish_reason is None for c in out[:-1])
    assert model.closed and model.sent == sent, "the model is not asked for the rest"
    assert out[-1].new_tokens == sum(len(c.token_ids) for c in _chunks(*pieces)[:sent]) or sent == len(pieces)
    assert rule.apply("".join(pieces)) == want


@pytest.mark.parametrize(
    ("text", "n", "want"),
    [
        ("Clothes keep us warm.", 9, "Clothes keep us warm."),  # fits: as written
        ("Clothes keep us warm. They also protect us from the sun and wind.", 9, "Clothes keep us warm."),
        ("A telescope is a tool that helps us see in the dark.", 9, "A telescope is a tool."),
        (
            "Purring in a cat's sleep is a natural behavior that helps warm the air inside.",
            9,
            "Purring in a cat's sleep is a natural behavior.",
        ),
        (
            "Honey, which bees make from nectar, is sweet and sticky and lasts forever.",
            9,
            "Honey, which bees make from nectar, is sweet.",
        ),
        ("Sunlight bends through spider silk and holds it in their bodies.", 9, "Sunlight bends through spider silk."),
        # not before "to": what follows completes the sentence ("a way for cats." was cut so once)
        (
            "Purring is a way for cats to communicate with their owners and friends.",
            9,
            "Purring is a way for cats to communicate.",
        ),
        (
            "Bees make honey to feed their young ones during the long cold winter.",
            9,
            "Bees make honey to feed their young ones.",
        ),
        # a cut that would keep less than half the cap is no answer: the first words, none dangling
        (
            "The answer to this question is rooted in the ancient art of fashion.",
            9,
            "The answer to this question is rooted.",
        ),
        (
            "Photosynthesis converts sunlight carbon dioxide water glucose oxygen everywhere always.",
            5,
            "Photosynthesis converts sunlight carbon dioxide.",
        ),
    ],
)
def test_a_word_cap_keeps_whole_sentences_else_cuts_where_a_clause_ends(text, n, want):
    assert cap_words(text, n) == want
    assert len(cap_words(text, n).split()) <= n


def _fixes(pairs, long="It is a very long question with a very long answer. Here is more of it, and more."):
    return [Example("sft", ({"role": "user", "content": q},), (a,), meta={"replaces": long}) for q, a in pairs]


TEN = (
    ("Why do birds migrate?", "Birds migrate to find food and warmer weather."),
    ("How does a rainbow form?", "Sunlight bends through raindrops and splits into colors."),
    ("What is a battery?", "A battery stores energy and releases it as electricity."),
    ("What is a map?", "A map is a drawing of a place."),
)


def test_short_plain_answers_that_cut_every_reply_they_correct_show_a_word_cap():
    assert shared_words(_fixes(TEN)) == 9, "the longest answer shown"
    assert shared_words(_fixes(TEN[:2])) == 0, "two questions are not a register"
    good = Example(
        "sft", ({"role": "user", "content": "Sun?"},), ("The sun is a star that lights and warms the Earth.",)
    )
    assert shared_words(_fixes(TEN) + [good]) == 11, "a reply rated good is within it"
    assert shared_words(_fixes(TEN, long="A battery stores energy.")) == 0, "a correction that is no shorter"
    assert shared_words(_fixes((*TEN, ("Is ice cold?", "Yes.")))) == 0, "one word is an answer, not a length"
    assert shared_words(_fixes((*TEN, ("Tea?", "1. Boil water. 2. Pour it.")))) == 0, "a list is a format"
    assert shared_words(_fixes((*TEN, ("Date?", "1945-09-02")))) == 0
    assert shared_words([dataclasses.replace(e, meta={}) for e in _fixes(TEN)]) == 0, "no reply to compare with"
    wordy = tuple((q, " ".join(["word"] * (MAX_WORDS + 1)) + ".") for q, _ in TEN)
    assert shared_words(_fixes(wordy, long=" ".join(["w"] * 99))) == 0, "beyond MAX_WORDS: no register of brevity"


def test_a_word_cap_is_recorded_described_and_put_only_where_the_adapter_answers():
    rule = Rule(words=9)
    assert rule and rule.record() == ["", "", 0, [], 9] and Rule.recorded(rule.record()) == rule
    assert Rule.recorded(["Well, ", "", 0, ["digits"], 12]) == Rule("Well, ", "", 0, ("digits",), 12)
    for bad in (["", "", 0, [], MAX_WORDS + 1], ["", "", 0, [], -1], ["", "", 0, [], "9"], ["", "", 0, [], True]):
        assert Rule.recorded(bad) is None, bad
    assert Rule.recorded(["", "", 0, [], 0]) is None, "a rule of nothing"
    assert rule.describe() == "at most 9 words where it answers" == rule.on_replies()
    assert Rule("Well, ", words=9).on_replies() == "starts 'Well,' on every reply; at most 9 words where it answers"
    long = "A telescope is a tool that helps us see in the dark."
    assert rule.apply(long) == "A telescope is a tool."
    assert rule.apply(long, "What is a telescope?", covered=False) == long, "the base answered: not cut"
    assert Rule("Well, ", words=9).apply(long) == "Well, a telescope is a tool.", "the opening is no word of the answer"


@pytest.mark.parametrize("seed", range(6))
def test_a_word_cap_on_the_stream_says_what_apply_says_and_stops_the_model(seed):
    import random

    rnd = random.Random(seed)
    for text in (
        "A telescope is a tool that helps us see in the dark. It is old.",
        "Birds fly south.",
        "A b c d e f g h i",
    ):
        cuts = sorted(rnd.sample(range(1, len(text)), 5))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)] + [""]
        model = _Model(*pieces)
        out = list(Rule(words=8).stream(model))
        assert "".join(c.text for c in out) == Rule(words=8).apply(text), (seed, pieces)
        assert out[-1].finish_reason == "stop" and all(c.finish_reason is None for c in out[:-1])
        assert model.closed
        if len(text.split()) > 9:
            assert model.sent < len(pieces), "the model is not asked for the rest once a word over is whole"
        plain = list(Rule(words=8).stream(iter(_chunks(*pieces)), covered=False))
        assert "".join(c.text for c in plain) == text, "not where the base answered"
