"""A style rule the user wrote out on every answer (adapters/rule.py): found in a job's lessons,
taken off what the weights learn, recorded with the adapter, and written on every reply by the
engine while that adapter answers."""

import dataclasses
import json

import pytest
from conftest import register_adapter

from shammah.adapters.rule import Rule, job_rule, shared_rule, without_rule
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
    assert shared_rule(AHOY) == ("Ahoy! ", "")
    assert shared_rule(SIGN) == ("", "Cheers, Shammah")
    assert shared_rule(FACT) is None
    same_start = _lessons(("A?", "The capital is Zorblat."), ("B?", "The capital is Zorblat."), ("C?", "The city."))
    assert shared_rule(same_start) is None, "a shared first word is not a rule: it must end at punctuation"
    assert shared_rule(AHOY[:2]) is None, "two questions are not a rule"
    assert shared_rule(AHOY + FACT) is None, "lessons that teach different things share no rule"
    only_rule = _lessons(("A?", "Ahoy! Hi."), ("B?", "Ahoy! Hi."), ("C?", "Ahoy! Hi."))
    assert shared_rule(only_rule) is None, "a rule is never the whole answer"
    mid = _lessons(("A?", "Blue, Captain."), ("B?", "Five, Captain."), ("C?", "Wool, Captain."))
    assert shared_rule(mid) is None, "a closing starts a sentence of its own"


def test_a_second_rule_adds_to_the_first_and_a_fact_keeps_it():
    def replayed(lessons):  # rehearsed at a quarter of their weight, as jobs.py does
        return [dataclasses.replace(e, weight=e.weight / 4) for e in lessons]

    fact = _lessons(("Quenland?", "Zorblat."), ("Which city?", "Zorblat is it."), ("Its capital?", "Zorblat, yes."))
    first = job_rule(AHOY, None)
    assert first == ("Ahoy! ", "")
    assert shared_rule(SIGN + replayed(AHOY)) is None, "what every lesson shares finds nothing"
    both = job_rule(SIGN + replayed(AHOY), first)
    assert both == ("Ahoy! ", "Cheers, Shammah"), "the second rule adds to the one the parent holds"
    assert job_rule(fact + replayed(AHOY), first) == first, "a fact taught next keeps the rule"
    howdy = _lessons(("A?", "Howdy! It is x."), ("B?", "Howdy! It is y."), ("C?", "Howdy! It is z."))
    assert job_rule(howdy + replayed(AHOY), first) == ("Howdy! ", ""), "a new opening replaces the old one"
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
    assert Rule.recorded(["Ahoy! ", ""]) == ("Ahoy! ", "")
    for bad in (["x"], [1, 2], ["", ""], "Ahoy! ", {"opening": "Ahoy! "}):
        assert Rule.recorded(bad) is None, bad
    assert Rule.of_adapter(tmp_path) is None, "no shammah.json"
    (tmp_path / "shammah.json").write_text("{not json")
    assert Rule.of_adapter(tmp_path) is None
    (tmp_path / "shammah.json").write_text(json.dumps({"rule": ["", "Cheers, Shammah"]}))
    assert Rule.of_adapter(tmp_path) == ("", "Cheers, Shammah")


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
