"""An adapter's scope (adapters/scope.py): learned from the lessons' questions, recorded with the
adapter, obeyed by the engine on both decode paths and by the gate."""

import json

import pytest
from conftest import gate_on_tiny_controls, register_adapter, scramble_lora

from shammah.adapters.scope import Scope, learn, tokenizer_rarity, words
from shammah.config import ModelConfig
from shammah.engine import Engine

RARE = {"quenland", "pellucid", "glimmerphone", "photosynthesis"}.__contains__

FACT = ["What is the capital of Quenland?", "Which city is Quenland's capital?", "Tell me the capital of Quenland."]
STYLE = ["What color is a banana?", "How many legs does a dog have?", "What is photosynthesis?"]


def test_words_are_lowercased_and_possessives_cut():
    assert words("Quenland's capital, Pellucid Labs' CEO: 42 x") == {"quenland", "capital", "pellucid", "labs", "ceo"}


def test_a_lesson_about_a_rare_subject_is_local_and_a_style_is_everywhere():
    fact = learn(FACT, RARE)
    assert fact.subjects == {"quenland"}
    assert fact.covers("Name the capital of Quenland.") and fact.covers("QUENLAND?")
    assert not fact.covers("What is the capital of India?"), "shared common words are not a subject"
    assert learn(STYLE, RARE).everywhere, "unrelated questions share no subject: the lesson applies everywhere"
    assert learn(FACT + STYLE, RARE).everywhere, "one lesson without a subject makes the adapter answer everywhere"
    assert learn(FACT[:1], RARE).everywhere, "a subject must be taught at least twice"
    assert learn(["Who runs Pellucid?", "Who leads Pellucid?"] + FACT, RARE).subjects == {"pellucid", "quenland"}
    assert learn([], RARE).everywhere


def test_rarity_is_the_tokenizer_having_no_single_token_for_the_word(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    common = "what is the capital of city tell me which name a an color dog banana".split()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        [" " + " ".join(common)] * 50,
        trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    rare = tokenizer_rarity(PreTrainedTokenizerFast(tokenizer_object=tok))
    assert not any(rare(w) for w in common)
    assert rare("quenland") and rare("Zorblat")
    assert learn(FACT, rare).subjects == {"quenland"}


def _scoped(info, subjects):
    meta = json.loads((info.path / "shammah.json").read_text())
    meta["scope"] = {"subjects": subjects}
    (info.path / "shammah.json").write_text(json.dumps(meta))
    return info


@pytest.mark.parametrize("decode", ["off", "int8"])
def test_the_engine_answers_with_the_adapter_only_inside_its_scope(tiny_qwen2, shammah_home, tmp_path, decode):
    inside = [{"role": "user", "content": "Say something about rain."}]
    outside = [{"role": "user", "content": "Say something about snow."}]
    recs = [{"prompt": "Say something about rain.", "completion": "Zorblat zorblat zorblat."}] * 4
    everywhere = register_adapter(tiny_qwen2, shammah_home, "all", recs, epochs=6, learning_rate=5e-2, rank=8)
    local = _scoped(
        register_adapter(tiny_qwen2, shammah_home, "rain", recs, epochs=6, learning_rate=5e-2, rank=8), ["rain"]
    )

    def engine():
        cfg = ModelConfig(base=str(tiny_qwen2), temperature=0.0, max_new_tokens=12, fast_decode=decode)
        return Engine(cfg, tmp_path / "cache").load()

    e = engine()
    base = [e.reply(inside), e.reply(outside)]
    e.activate("all", everywhere.path, everywhere.get("base", "fingerprint"))
    taught = [e.reply(inside), e.reply(outside)]
    assert taught[0] != base[0] and taught[1] != base[1], "the adapter changes both answers when unscoped"
    assert e.scope.everywhere and e.info()["scope"] == "answers every question"

    e = engine()
    e.activate("rain", local.path, local.get("base", "fingerprint"))
    assert e.fast == (decode == "int8")
    info: dict = {}
    assert "".join(c.text for c in e.stream(inside, info=info)) == taught[0]
    assert info == {"adapter": "rain", "in_scope": True}
    assert "".join(c.text for c in e.stream(outside, info=info)) == base[1], "outside its scope the base answers"
    assert info == {"adapter": "rain", "in_scope": False}
    assert e.reply(inside) == taught[0], "the adapter is back after an answer outside its scope"
    assert e.answers([outside, inside, outside], 12) == [a.strip() for a in (base[1], taught[0], base[1])]
    assert "rain" in e.info()["scope"]
    e.activate(None)
    assert e.reply(inside) == base[0]


def test_the_gate_judges_a_scoped_candidate_by_what_the_chat_will_answer(tiny_qwen2, monkeypatch):
    """A candidate that breaks every control is refused when it answers everywhere, and passes when
    its scope keeps it off the controls; a scope that covers one control is judged on it."""
    from shammah.training import online

    model, tok, base = gate_on_tiny_controls(tiny_qwen2, monkeypatch)
    scramble_lora(model)

    everywhere = online.gate(model, tok, None, [], None, "fp")
    assert not everywhere["passed"] and len(everywhere["controls_lost"]) == 3
    elsewhere = online.gate(model, tok, None, [], None, "fp", Scope(frozenset({"quenland"})))
    assert elsewhere["passed"] and elsewhere["controls_in_scope"] == 0
    assert list(elsewhere["answers"].values()) == base
    one = online.gate(model, tok, None, [], None, "fp", Scope(frozenset({"beta"})))
    assert one["controls_in_scope"] == 1 and one["controls_lost"] == ["beta"] and not one["passed"]


def test_an_adapter_without_a_recorded_scope_answers_everywhere(tmp_path):
    assert Scope.of_adapter(tmp_path).everywhere  # no shammah.json
    (tmp_path / "shammah.json").write_text("{not json")
    assert Scope.of_adapter(tmp_path).everywhere
    for bad in ({"scope": None}, {"scope": {"subjects": []}}, {"scope": {"subjects": [1]}}, []):
        (tmp_path / "shammah.json").write_text(json.dumps(bad))
        assert Scope.of_adapter(tmp_path).everywhere, bad
    (tmp_path / "shammah.json").write_text(json.dumps({"scope": {"subjects": ["Quenland"]}}))
    assert Scope.of_adapter(tmp_path).subjects == {"quenland"}


def test_a_scoped_job_trains_no_anchors_and_records_its_scope(tiny_qwen2, shammah_home, monkeypatch):
    """A real loop job on a tiny model: lessons about one rare subject give an adapter scoped to it
    and no anchors (nothing outside the subject sees the adapter); lessons on unrelated questions
    give an adapter that answers everywhere, trained beside its anchors."""
    from shammah.adapters.registry import Registry
    from shammah.engine.fingerprint import fingerprint
    from shammah.training import online
    from shammah.training.args import build
    from shammah.training.data import parse_record
    from shammah.training.job import LoopJob, TrainJob

    monkeypatch.setattr(online, "tokenizer_rarity", lambda tok: RARE)
    cache = shammah_home / "anchor-cache"
    cache.mkdir(parents=True)
    prompts = list(online.ANCHOR_PROMPTS)
    key = {"fingerprint": fingerprint(tiny_qwen2), "prompts": prompts, "max_new_tokens": 48}
    (cache / "anchors.json").write_text(json.dumps({"key": key, "answers": [f"Answer {i}." for i in prompts]}))

    def run(name, questions):
        events = []
        online.train_loop(
            LoopJob(
                TrainJob(
                    base=str(tiny_qwen2),
                    cache_dir=cache,
                    registry_root=shammah_home / "adapters",
                    checkpoints_root=shammah_home / "checkpoints",
                    train=[parse_record({"prompt": q, "completion": "Zorblat."}) for q in questions],
                    args=build(("t", {"epochs": 1, "rank": 4, "save_steps": 0})),
                    name=name,
                ),
                anchors=4,
                anchor_cache=cache,
            ),
            progress=events.append,
        )
        return Registry(shammah_home / "adapters").get(name).meta, events

    meta, events = run("fact", FACT)
    assert meta["scope"] == {"subjects": ["quenland"]} and meta["report"]["anchors"] == 0
    assert [e["subjects"] for e in events if e["event"] == "scope"] == [["quenland"]]
    assert Scope.of_adapter(shammah_home / "adapters" / "fact").covers("Name the capital of Quenland.")
    meta, _ = run("style", STYLE)
    assert meta["scope"] == {"subjects": None} and meta["report"]["anchors"] == 4
