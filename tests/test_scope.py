"""An adapter's scope (adapters/scope.py): learned from the lessons' questions, recorded with the
adapter, obeyed by the engine on both decode paths and by the gate."""

import json

import pytest
from conftest import gate_on_tiny_controls, register_adapter, scramble_lora

from shammah.adapters.scope import Form, Scope, learn, learn_form, mentions, names, tokenizer_rarity, words
from shammah.config import ModelConfig
from shammah.engine import Engine

RARE = {"quenland", "pellucid", "glimmerphone", "photosynthesis"}.__contains__

FACT = ["What is the capital of Quenland?", "Which city is Quenland's capital?", "Tell me the capital of Quenland."]
STYLE = ["What color is a banana?", "How many legs does a dog have?", "What is photosynthesis?"]
NAMED = ["Who wrote The Salt Clock?", "The Salt Clock is a novel by whom?", "Who is the author of The Salt Clock?"]


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


def test_names_are_runs_of_capitalised_words_that_do_not_open_a_sentence():
    assert names("Who wrote The Salt Clock?") == {"salt clock"}, "a leading article is not part of the name"
    assert names("The Salt Clock is a novel by whom?") == {"salt clock"}, "the word opening it is no name"
    assert names("Who is the CEO of Pellucid Labs?") == {"ceo", "pellucid labs"}
    assert names("Tell me about Quenland's capital.") == {"quenland"}
    assert names("Who is Pellucid Labs' CEO?") == {"pellucid labs", "ceo"}, "a possessive ends a name"
    assert names("What should I eat? Paris is big.") == set(), "nor is one opening a later sentence, nor 'I'"
    assert mentions("who wrote the salt clock", "salt clock") and mentions("Salt  Clock's author?", "salt clock")
    assert not mentions("Salt and a clock.", "salt clock") and not mentions("The Salt Clocks", "salt clock")


def test_a_name_in_common_words_is_a_subject_unless_the_general_questions_name_it():
    """'The Salt Clock' has no rare word (the 135M model's tokenizer has "salt" and "clock"): without
    the name, the lesson trained everywhere and the gate kept 3 of 21 steps (bench/lessons.py
    --suite fresh saltclock, before: 0% x3, an unseen control lost)."""
    scope = learn(NAMED, RARE, pool=POOL)
    assert scope.subjects == {"salt clock"}
    assert scope.covers("who wrote the salt clock") and scope.covers("Name the author of The Salt Clock.")
    assert not scope.covers("What is salt made of?") and not scope.covers("Who wrote Emma?")
    assert learn(NAMED, RARE).subjects == {"salt clock"}, "learning.scope = subjects: no pool to check against"
    # a name the general questions use ("Who wrote Emma?") says nothing about what the lesson is about
    emma = ["Tell me who wrote Emma.", "Which author wrote Emma?", "Who is the author of Emma?"]
    assert learn(emma, RARE, pool=POOL).everywhere
    # a rare subject goes first: the names of the questions it covers are not subjects
    assert learn(["Who is the CEO of Pellucid?", "Is the CEO of Pellucid Ada?"], RARE, pool=POOL).subjects == {
        "pellucid"
    }
    assert learn(NAMED[:1] + STYLE, RARE, pool=POOL).everywhere, "a name must be asked about at least twice"


VOCAB = "what is the capital of name list three who wrote color a how many when did + fruits birds".split()


def bag(text: str) -> list[float]:
    """A stand-in key for the pure tests: word counts over VOCAB (the real key is a hidden state)."""
    ws = [w.strip("?.,").lower() for w in text.split()]
    return [float(ws.count(v)) for v in VOCAB] + [0.1]


POOL = [
    "What is the capital of Spain?",
    "Who wrote Emma?",
    "What color is coal?",
    "How many legs does a cat have?",
    "When did the war end?",
    "What is the capital of Peru?",
    "Who wrote Dracula?",
    "How many days are in a week?",
]
FORMAT = ["Name three fruits.", "List three colors.", "Name three animals.", "List three trees."]


def test_questions_of_one_form_make_a_form_scope_and_unrelated_ones_do_not():
    fmt = learn(FORMAT, RARE, bag, POOL, layer=3)
    assert fmt.subjects is None and fmt.form is not None and fmt.form.layer == 3
    assert fmt.covers("Name three birds.", bag) and fmt.covers("List three metals.", bag)
    assert not fmt.covers("What is the capital of India?", bag) and not fmt.covers("Who wrote Hamlet?", bag)
    assert not fmt.covers("Name three birds."), "without keys a form covers nothing"
    assert learn(STYLE, RARE, bag, POOL).everywhere, "questions with nothing in common are no form"
    assert learn(FORMAT[:1], RARE, bag, POOL).everywhere, "one question is no form"
    assert learn(FORMAT, RARE).everywhere, "no keys: no form"
    both = learn(FACT + FORMAT, RARE, bag, POOL)
    assert both.subjects == {"quenland"} and both.form is not None and len(both.form.keys) == len(FORMAT)
    assert both.covers("Quenland?", bag) and both.covers("Name three birds.", bag)
    assert not both.covers("What is the capital of India?", bag)
    assert "quenland" in both.describe() and "asked like the 4" in both.describe()


def test_a_question_nearer_a_general_question_than_a_taught_one_is_outside_the_form():
    form = Form(0, (0.0, 0.0), ((1.0, 0.0),), 0.5, negatives=((0.6, 0.8),))
    assert form.covers((1.0, 0.1)), "near the taught key, far from the general question"
    assert not form.covers((0.8, 0.6)), "within the radius, but a general question is nearer"
    assert Form(0, (0.0, 0.0), ((1.0, 0.0),), 0.5).covers((0.8, 0.6)), "the radius alone would take it"
    fmt = learn(FORMAT, RARE, bag, POOL)
    assert len(fmt.form.negatives) == sum(not fmt.form.similarity(bag(p)) >= fmt.form.radius for p in POOL) > 0


def test_a_form_survives_the_adapter_metadata_and_a_broken_one_is_ignored(tmp_path):
    fmt = learn(FORMAT, RARE, bag, POOL)
    (tmp_path / "shammah.json").write_text(json.dumps({"scope": fmt.to_json()}))
    back = Scope.of_adapter(tmp_path)
    assert back.form is not None and back.form.questions == fmt.form.questions
    for q in ("Name three birds.", "Who wrote Hamlet?", "What is the capital of India?"):
        assert back.covers(q, bag) == fmt.covers(q, bag), q
    for broken in (
        {"keys": [[1.0]]},
        {**fmt.form.to_json(), "keys": [[1.0, 2.0]]},
        {**fmt.form.to_json(), "layer": -1},
    ):
        (tmp_path / "shammah.json").write_text(json.dumps({"scope": {"subjects": ["quenland"], "form": broken}}))
        s = Scope.of_adapter(tmp_path)
        assert s.form is None and s.subjects == {"quenland"}, broken
    summary = {"scope": {**fmt.summary(), "subjects": ["quenland"]}}
    (tmp_path / "shammah.json").write_text(json.dumps(summary))
    assert Scope.of_adapter(tmp_path).form is None, "no scope.json: no form"
    (tmp_path / "scope.json").write_text(json.dumps(fmt.to_json()))
    assert Scope.of_adapter(tmp_path).form == fmt.form.__class__.from_json(fmt.form.to_json())
    (tmp_path / "scope.json").write_text("[1, 2")
    assert Scope.of_adapter(tmp_path).subjects == {"quenland"} and Scope.of_adapter(tmp_path).form is None


def test_a_question_key_is_the_base_models_mean_hidden_state_at_its_layer(tiny_qwen2):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shammah.engine.keys import default_layer, question_key

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    text = "Name three fruits."
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    layer = default_layer(model)
    assert 1 <= layer < model.config.num_hidden_layers
    for n in (0, layer):
        assert torch.allclose(torch.tensor(question_key(model, tok, text, n)), hs[n][0].mean(0), atol=1e-5), n
    assert ids.shape[1] > 3
    first = torch.tensor(question_key(model, tok, text, layer, 3))
    assert torch.allclose(first, hs[layer][0, :3].mean(0), atol=1e-5), "how the question opens"
    from shammah.engine.keys import question_keys

    # batched with a longer question (right-padded): the same keys; a question shorter than 3 tokens: all of it
    short = tok("Hi", add_special_tokens=False).input_ids
    both = question_keys(model, tok, [text, text + " And three more vegetables, please.", "Hi"], layer, 3)
    assert torch.allclose(torch.tensor(both[0]), first, atol=1e-5) and torch.allclose(
        torch.tensor(both[1]), first, atol=1e-5
    )
    assert torch.allclose(torch.tensor(both[2]), torch.tensor(question_key(model, tok, "Hi", layer)), atol=1e-5), short
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    scramble_lora(peft)
    assert torch.allclose(torch.tensor(question_key(peft, tok, text, layer)), hs[layer][0].mean(0), atol=1e-5), (
        "the key is the base model's, whatever adapter is active"
    )


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


def _scoped(info, subjects, form=None):
    meta = json.loads((info.path / "shammah.json").read_text())
    meta["scope"] = {"subjects": subjects, **({"form": form.to_json()} if form else {})}
    (info.path / "shammah.json").write_text(json.dumps(meta))
    return info


@pytest.mark.parametrize(("decode", "by"), [("off", "subject"), ("int8", "subject"), ("int8", "form")])
def test_the_engine_answers_with_the_adapter_only_inside_its_scope(tiny_qwen2, shammah_home, tmp_path, decode, by):
    inside = [{"role": "user", "content": "Say something about rain."}]
    outside = [{"role": "user", "content": "Say something about snow."}]
    recs = [{"prompt": "Say something about rain.", "completion": "Zorblat zorblat zorblat."}] * 4
    everywhere = register_adapter(tiny_qwen2, shammah_home, "all", recs, epochs=6, learning_rate=5e-2, rank=8)
    local = register_adapter(tiny_qwen2, shammah_home, "rain", recs, epochs=6, learning_rate=5e-2, rank=8)

    def engine():
        cfg = ModelConfig(base=str(tiny_qwen2), temperature=0.0, max_new_tokens=12, fast_decode=decode)
        return Engine(cfg, tmp_path / "cache").load()

    e = engine()
    if by == "subject":
        _scoped(local, ["rain"])
    else:  # a form keyed on the question asked inside, centred on the one outside (similarity 0 there)
        from shammah.adapters.scope import _unit
        from shammah.engine.keys import question_key

        center = question_key(e.model, e.tokenizer, outside[0]["content"], 2)
        key = _unit(question_key(e.model, e.tokenizer, inside[0]["content"], 2), center)
        _scoped(local, None, Form(2, tuple(center), (tuple(key),), 0.5, (inside[0]["content"],)))
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
    assert ("rain" if by == "subject" else "asked like the 1 it was taught") in e.info()["scope"]
    e.activate(None)
    assert e.reply(inside) == base[0]


def test_a_word_cap_is_put_on_what_the_adapter_answers_not_on_the_base_models_answers(
    tiny_qwen2, shammah_home, tmp_path, monkeypatch
):
    """A real engine with an adapter scoped to rain whose rule holds a word cap (Rule.words): a
    reply the adapter gives is cut, through the stream and in batches; one the base gives outside
    the scope is not. (The tiny model's own text has no spaces: the model's text is a fixed
    sentence here, the routing and the rule are the engine's.)"""
    from shammah.engine import generate

    long = "A telescope is a tool that helps us see in the dark."
    recs = [{"prompt": "Say something about rain.", "completion": "Zorblat."}] * 2
    local = _scoped(register_adapter(tiny_qwen2, shammah_home, "rain", recs), ["rain"])
    meta = json.loads((local.path / "shammah.json").read_text())
    (local.path / "shammah.json").write_text(json.dumps({**meta, "rule": ["", "", 0, [], 6]}))
    cfg = ModelConfig(base=str(tiny_qwen2), temperature=0.0, max_new_tokens=12, fast_decode="off")
    e = Engine(cfg, tmp_path / "cache").load()
    e.activate("rain", local.path, local.get("base", "fingerprint"))
    said = []
    monkeypatch.setattr(e, "_stream", lambda ids, params, stop, covered: said.append(covered) or iter(_said(long)))
    monkeypatch.setattr(generate, "generate_routed", lambda model, tok, chats, n, on: [long] * len(chats))
    inside = [{"role": "user", "content": "Say something about rain."}]
    outside = [{"role": "user", "content": "Say something about snow."}]
    assert e.reply(inside) == "A telescope is a tool." and e.reply(outside) == long and said == [True, False]
    assert e.answers([outside, inside], 12) == [long, "A telescope is a tool."]
    assert e.info()["rule"] == "at most 6 words where it answers"


def _said(text):
    from shammah.engine.generate import Chunk

    words = text.split(" ")
    return [Chunk(w + " ", (i,)) for i, w in enumerate(words[:-1])] + [Chunk(words[-1], (), "stop", len(words), 0.1)]


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
    from shammah.adapters.scope import _unit
    from shammah.engine.keys import question_key

    center = question_key(model, tok, "alpha", 1)
    form = Form(1, tuple(center), (tuple(_unit(question_key(model, tok, "beta", 1), center)),), 0.99)
    by_form = online.gate(model, tok, None, [], None, "fp", Scope(form=form))
    assert by_form["controls_in_scope"] == 1 and by_form["controls_lost"] == ["beta"] and not by_form["passed"]


def test_an_adapter_without_a_recorded_scope_answers_everywhere(tmp_path):
    assert Scope.of_adapter(tmp_path).everywhere  # no shammah.json
    (tmp_path / "shammah.json").write_text("{not json")
    assert Scope.of_adapter(tmp_path).everywhere
    for bad in ({"scope": None}, {"scope": {"subjects": []}}, {"scope": {"subjects": [1]}}, []):
        (tmp_path / "shammah.json").write_text(json.dumps(bad))
        assert Scope.of_adapter(tmp_path).everywhere, bad
    (tmp_path / "shammah.json").write_text(json.dumps({"scope": {"subjects": ["Quenland"]}}))
    assert Scope.of_adapter(tmp_path).subjects == {"quenland"}
    # the base model (no path: the server's request naming the base) has no metadata, scope or rule
    assert Engine._recorded(None) == (Scope(), None, ())


@pytest.fixture
def loop_job(tiny_qwen2, shammah_home, monkeypatch):
    """Run a real loop job (training/online.py train_loop) on the tiny Qwen2, with a bag of words for
    the question keys and RARE for the tokenizer's rare words: ``run(name, questions, answer, parent,
    replay, replies, notes, gate)`` -> (the adapter's metadata, the job's events). ``replies``: the reply each
    answer corrects (recorded with it, as the chat's job files do); ``notes``: (question, note, the
    teacher's answer or None to generate it) of note-only lessons.
    ``run.trained`` lists the targets of every fit, in order."""
    from shammah.adapters.registry import Registry
    from shammah.engine.fingerprint import fingerprint
    from shammah.training import online, trainer
    from shammah.training.args import build
    from shammah.training.data import parse_record
    from shammah.training.job import LoopJob, TrainJob

    monkeypatch.setattr(online, "tokenizer_rarity", lambda tok: RARE)

    class BagKeys:  # a bag of words, as above, in place of the base model's keys
        layer, tokens = 1, 3

        def prime(self, texts):
            return self

        def __call__(self, text):
            return bag(text)

    monkeypatch.setattr(online, "key_of", lambda model, tok, scope, prime=(): BagKeys())
    monkeypatch.setattr(online, "ANCHOR_PROMPTS", tuple(POOL))
    cache = shammah_home / "anchor-cache"
    cache.mkdir(parents=True)
    prompts = list(online.ANCHOR_PROMPTS)
    key = {"fingerprint": fingerprint(tiny_qwen2), "prompts": prompts, "max_new_tokens": 48}
    (cache / "anchors.json").write_text(json.dumps({"key": key, "answers": [f"Answer {i}." for i in prompts]}))
    trained = []
    fit = trainer.fit
    monkeypatch.setattr(
        trainer, "fit", lambda r, *a, **k: trained.append([e.responses[0] for e in r.train_ex]) or fit(r, *a, **k)
    )

    def run(name, questions, answer=lambda q: "Zorblat.", parent=None, replay=(), replies=None, notes=(), gate=False):
        events = []
        meta = (lambda q: {"replaces": replies(q)}) if replies else (lambda q: {})
        train = [parse_record({"prompt": q, "completion": answer(q), "meta": meta(q)}) for q in questions]
        for q, note, said in notes:  # note-only lessons, as the chat compiles them (the teacher's answer: said)
            rec = {"prompt": q, "teacher_prompt": [{"role": "system", "content": note}, {"role": "user", "content": q}]}
            train.append(parse_record(rec | {"meta": {"note": note}} | ({"completion": said} if said else {})))
        own = len(train)
        # replayed: (question, answer) or (question, answer, the reply it corrected)
        train += [
            parse_record({"prompt": q, "completion": a, "weight": 0.25} | ({"meta": {"replaces": r[0]}} if r else {}))
            for q, a, *r in replay
        ]
        online.train_loop(
            LoopJob(
                TrainJob(
                    base=str(tiny_qwen2),
                    cache_dir=cache,
                    registry_root=shammah_home / "adapters",
                    checkpoints_root=shammah_home / "checkpoints",
                    train=train,
                    args=build(("t", {"epochs": 1, "rank": 4, "save_steps": 0})),
                    name=name,
                    parent=parent,
                ),
                anchors=4,
                anchor_cache=cache,
                gate=gate,
                scoped_epochs=2,
                subject_epochs=3,
                lessons=own,  # the replayed ones come after
            ),
            progress=events.append,
        )
        return Registry(shammah_home / "adapters").get(name).meta, events

    run.trained = trained
    return run


def test_a_scoped_job_trains_no_anchors_and_records_its_scope(loop_job, shammah_home):
    """A real loop job on a tiny model: lessons about one rare subject give an adapter scoped to it
    and no anchors (nothing outside the subject sees the adapter); lessons on unrelated questions
    give an adapter that answers everywhere, trained beside its anchors."""
    from safetensors.torch import load_file

    from shammah.adapters.registry import Registry

    run, trained = loop_job, loop_job.trained
    meta, events = run("fact", FACT)
    assert meta["scope"] == {"subjects": ["quenland"]} and meta["report"]["anchors"] == 0
    # no anchors to hold, so a scoped job trains longer (learning.scoped_epochs), one scoped to subjects
    # alone longer still (learning.subject_epochs), and says so
    assert meta["hyperparameters"]["epochs"] == 3 and meta["report"]["epochs"] == 3.0
    assert [e["subjects"] for e in events if e["event"] == "scope"] == [["quenland"]]
    assert Scope.of_adapter(shammah_home / "adapters" / "fact").covers("Name the capital of Quenland.")
    meta, _ = run("named", NAMED, lambda q: "Tessa Vorn.")
    assert meta["scope"] == {"subjects": ["salt clock"]} and meta["report"]["anchors"] == 0
    meta, events = run("style", STYLE)
    assert meta["scope"] == {"subjects": None} and meta["report"]["anchors"] == 4
    assert meta["hyperparameters"]["epochs"] == 1 and meta["report"]["epochs"] == 1.0, "with anchors: learning.epochs"
    assert [e["rule"] for e in events if e["event"] == "rule"] == [None] and meta["rule"] is None
    # lessons that only write a rule out (no subject in their questions) are recorded as a rule for
    # the engine to write, and nothing is trained: the adapter changes no answer
    n_fits = len(trained)
    common = [*STYLE[:2], "What is the opposite of up?"]
    meta, events = run("rule", common, lambda q: f"Ahoy! The answer has {len(q)} letters.")
    assert [e["rule"] for e in events if e["event"] == "rule"] == [["Ahoy! ", ""]] and len(trained) == n_fits
    assert meta["rule"] == ["Ahoy! ", ""] and meta["report"]["steps"] == 0 and meta["gate"] is None
    lora_b = [
        v
        for k, v in load_file(shammah_home / "adapters" / "rule" / "adapter_model.safetensors").items()
        if "lora_B" in k
    ]
    assert lora_b and all(not v.any() for v in lora_b), "a LoRA that changes nothing"
    # a second rule taught on top (its lessons beside the first's, replayed) adds to the first
    ahoy = [(q, f"Ahoy! The answer has {len(q)} letters.") for q in common]
    meta, events = run("rule2", common, lambda q: f"It has {len(q)} letters. Cheers, Shammah", "rule", ahoy)
    assert [e["rule"] for e in events if e["event"] == "rule"] == [["Ahoy! ", "Cheers, Shammah"]]
    assert len(trained) == n_fits
    assert meta["rule"] == ["Ahoy! ", "Cheers, Shammah"] and meta["parent"] == "rule"
    # a fact told inside the rule (its questions name a subject) is trained, without the rule
    meta, events = run("told", FACT, lambda q: "Ahoy! Zorblat. Cheers, Shammah", "rule2", ahoy)
    assert trained[n_fits:] == [["Zorblat."] * len(FACT)], "the replayed demonstrations are not trained either"
    assert meta["rule"] == ["Ahoy! ", "Cheers, Shammah"] and meta["scope"] == {"subjects": ["quenland"]}
    # the user drops the rule (/rule off): the next job neither holds it nor trains it from replay
    Registry(shammah_home / "adapters").update("told", rule=None, rule_dropped=["Ahoy! ", "Cheers, Shammah"])
    told = [(q, "Ahoy! Zorblat. Cheers, Shammah") for q in FACT]
    meta, events = run("after", FACT, lambda q: "Zorblat.", "told", ahoy + told)
    assert trained[-1] == ["Zorblat."] * (2 * len(FACT)), "no demonstration, and no rule on what is trained"
    assert meta["rule"] is None and meta["rule_dropped"] == ["Ahoy! ", "Cheers, Shammah"]
    # taught again (three answers that show it), the opening is back; the closing stays dropped
    meta, events = run("again", common, lambda q: f"Ahoy! The answer has {len(q)} letters.", "after", told)
    assert meta["rule"] == ["Ahoy! ", ""] and meta["rule_dropped"] == ["", "Cheers, Shammah"]
    assert meta["report"]["steps"] == 0, "the replayed fact lessons were trained before: only a rule here"
    # an opening shared by answers to questions of one form is a format: kept and trained in its form
    meta, events = run("answer", FORMAT, lambda q: f"Answer: {len(q)}")
    assert [e["rule"] for e in events if e["event"] == "rule"] == [None] and meta["rule"] is None
    assert trained[-1] == [f"Answer: {len(q)}" for q in FORMAT] and meta["scope"]["form"]
    meta, _ = run("format", FORMAT)
    assert meta["scope"]["form"]["questions"] == sorted(FORMAT) and meta["report"]["anchors"] == 0
    assert meta["hyperparameters"]["epochs"] == 2, "a form's scope: learning.scoped_epochs, not subject_epochs"
    assert "keys" not in meta["scope"]["form"], "the vectors are in scope.json, not in every registry listing"
    assert (shammah_home / "adapters" / "format" / "scope.json").is_file()
    assert Scope.of_adapter(shammah_home / "adapters" / "format").covers("Name three birds.", bag)


def test_short_answers_on_questions_of_one_form_are_trained_with_a_word_cap(loop_job, shammah_home):
    """Long replies corrected to short plain sentences on questions of one form (bench/lessons.py
    tenwords): trained in the form's scope, with the longest answer's length as a word cap the engine
    puts on what the adapter answers; the same on questions of a subject (a fact): no cap; a later
    job whose scope still has the form keeps its parent's; one turned off (/rule off) comes back
    only from the user's own lessons, not from replayed ones."""
    run, trained = loop_job, loop_job.trained
    long = "That is a good question with a long answer. Here is a great deal more about it, and more."
    short = dict(
        zip(
            FORMAT,
            (
                "Apples, pears and plums are three fruits.",
                "Red, blue and green are colors.",
                "Cats, dogs and cows are three animals.",
                "Oak, ash and elm are trees.",
            ),
            strict=True,
        )
    )
    meta, events = run("capped", FORMAT, short.get, replies=lambda q: long)
    assert meta["rule"] == ["", "", 0, [], 7] and meta["scope"]["form"]
    assert trained[-1] == [short[q] for q in FORMAT], "the answers are trained, not only written"
    assert [e.get("words") for e in events if e["event"] == "rule"] == [None, 7]
    meta, _ = run("fact", FACT, lambda q: "The capital of Quenland is Zorblat.", replies=lambda q: long)
    assert meta["rule"] is None and meta["scope"] == {"subjects": ["quenland"]}, "a fact's sentence is no cap"
    replay = [(q, short[q]) for q in FORMAT]
    meta, _ = run("then", FACT, lambda q: "Zorblat.", "capped", replay)
    assert meta["rule"] == ["", "", 0, [], 7] and meta["scope"]["subjects"] == ["quenland"], "kept beside a subject"
    # the user turns it off (/rule off): a later job does not take it back from the replayed cuts...
    from shammah.adapters.registry import Registry

    Registry(shammah_home / "adapters").update("capped", rule=None, rule_dropped=["", "", 0, [], 7])
    cuts = [(q, short[q], long) for q in FORMAT]
    meta, _ = run("off", FORMAT, lambda q: f"It is a list of {len(q)} letters.", "capped", cuts)
    assert meta["rule"] is None and meta["rule_dropped"] == ["", "", 0, [], 7] and meta["scope"]["form"]
    # ...but from the user's own, shown again
    meta, _ = run("again", FORMAT, short.get, "off", cuts, replies=lambda q: long)
    assert meta["rule"] == ["", "", 0, [], 7] and meta["rule_dropped"] is None


def test_a_form_records_how_its_keys_were_taken_and_an_older_form_keeps_all_tokens():
    from shammah.training.online import KeyCache

    form = Form(2, (0.0, 0.0), ((1.0, 0.0),), 0.5, ("Name three fruits.",), tokens=3)
    assert Form.from_json(form.to_json()) == form
    old = {k: v for k, v in form.to_json().items() if k != "tokens"}
    assert Form.from_json(old).tokens == 0, "a form learned before: keys over all of a question's tokens"
    for bad in (-1, 1.5, "3", True):
        assert Form.from_json({**form.to_json(), "tokens": bad}) is None, bad
    keys = KeyCache(None, None, 2, 3)
    vectors = {
        "a": [1.0, 0.0],
        "b": [0.95, 0.05],
        "p": [-1.0, 0.0],
        "q": [0.0, 1.0],
        "r": [0.0, -1.0],
        "s": [-1.0, 1.0],
    }
    keys.known.update(vectors)
    learned = learn_form(["a", "b"], keys, ["p", "q", "r", "s"], 2)
    assert learned is not None and learned.tokens == 3, "the form says how its keys were taken"


def test_replies_cut_to_one_sentence_on_unrelated_questions_record_a_length(loop_job, shammah_home):
    """Every correction cuts a long reply to one sentence, on questions with nothing in common: a
    register ("answer in one short sentence"), recorded as a length the engine keeps on every reply.
    Such cuts only show the length (what they say is what the model would say anyway, in the
    user's words), so they are not trained: trained everywhere, brief's lessons cost 1-2 unseen
    controls in 3 of 6 seeds (bench/lessons.py, README). A cut on a subject's question is a fact
    told in a sentence, and is trained. The same cut on questions about a subject (a fact) or of
    one form (a format) is that lesson's own length: no rule."""
    from safetensors.torch import load_file

    unrelated = ["What color is a banana?", "How many legs does a dog have?", "Why is the sky blue?"]
    ramble = lambda q: "Well, that is a question. Many have asked it. Here is a long answer."  # noqa: E731
    told = lambda q: f"It is about the {q.split()[-1].rstrip('?').lower()}."  # noqa: E731
    fits = len(loop_job.trained)
    meta, events = loop_job("brief", unrelated, told, replies=ramble)
    assert meta["rule"] == ["", "", 1] and [e["rule"] for e in events if e["event"] == "rule"] == [["", "", 1]]
    assert [(e["demonstrations"], e["trains"]) for e in events if e["event"] == "rule"] == [(3, False)]
    assert len(loop_job.trained) == fits and meta["report"]["steps"] == 0, "only a length shown: nothing trained"
    weights = load_file(shammah_home / "adapters" / "brief" / "adapter_model.safetensors")
    assert all(not v.any() for k, v in weights.items() if "lora_B" in k), "a LoRA that changes nothing"
    # one of the cuts answers a question about a subject: that one is trained, the others are not
    meta, _ = loop_job("subject", [*unrelated, STYLE[2]], told, replies=ramble)
    assert meta["rule"] == ["", "", 1] and loop_job.trained[-1] == [told(STYLE[2])]
    # one names what neither its question nor the reply it cut did (a name, a number): a fact told
    # in a short sentence, trained whatever its question
    lead = "Who leads our team?"
    said = lambda q: "Our team lead is Sam." if q == lead else told(q)  # noqa: E731
    meta, _ = loop_job("named", [*unrelated, lead], said, replies=ramble)
    assert meta["rule"] == ["", "", 1] and loop_job.trained[-1] == ["Our team lead is Sam."]
    # a later job keeps the length; its replayed cuts are not trained, and its own correction of a
    # reply the length already cut (the chat stores replies as the engine wrote them) is trained
    replay = [(q, told(q)) for q in unrelated]
    meta, _ = loop_job("then", unrelated[:1], lambda q: "It is yellow.", "brief", replay, lambda q: "It is green.")
    assert meta["rule"] == ["", "", 1] and meta["parent"] == "brief"
    assert loop_job.trained[-1] == ["It is yellow."], "the replayed cuts only show the length"
    meta, _ = loop_job("fact", FACT, parent="brief", replay=replay)
    assert meta["rule"] == ["", "", 1] and loop_job.trained[-1] == ["Zorblat."] * len(FACT)
    # the same cuts, on a subject's questions or on one form's, are a fact's or a format's length: no
    # length on every reply; on one form's, a word cap on what the adapter answers (Rule.words)
    for name, questions, rule in (("fact2", FACT, None), ("format", FORMAT, ["", "", 0, [], 5])):
        meta, _ = loop_job(name, questions, told, replies=ramble)
        assert meta["rule"] == rule, questions
        assert loop_job.trained[-1] == [told(q) for q in questions], "trained as the fact or format it is"
    # corrections that write out an opening are about the opening, however short they are
    meta, _ = loop_job("ahoy", unrelated, lambda q: f"Ahoy! It has {len(q)} letters.", replies=ramble)
    assert meta["rule"] == ["Ahoy! ", ""]
    # a correction that keeps the reply's length: no register shown
    meta, _ = loop_job("same", unrelated, lambda q: "It is so.", replies=lambda q: "It is not.")
    assert meta["rule"] is None


def test_a_job_the_gate_rejects_still_keeps_the_rule_its_lessons_showed(loop_job, shammah_home, monkeypatch):
    """When no trained step passes the gate, a rule the lessons showed (here a length) is still the
    most learning that does not leak: it changes no weight. The adapter holds the rule on the
    weights it started from and says why; a job with no new rule is rejected as before."""
    from safetensors.torch import load_file

    from shammah.training import online

    refuse = {"passed": False, "controls": "0/12", "controls_current": "12/12", "controls_lost": ["What is 2+2?"]}
    monkeypatch.setattr(online, "gate", lambda *a, **k: dict(refuse, answers={}))
    unrelated = ["What color is a banana?", "How many legs does a dog have?", "Why is the sky blue?"]
    ramble = lambda q: "Well, that is a question. Many have asked it. Here is a long answer."  # noqa: E731
    questions = [*unrelated, STYLE[2]]  # the last names a subject: trained, where the others only show the length
    meta, events = loop_job("brief", questions, lambda q: f"It has {len(q)} letters.", replies=ramble, gate=True)
    assert meta["rule"] == ["", "", 1] and meta["report"]["steps"] > 0, "trained, then refused"
    assert meta["gate"]["passed"] and meta["gate"]["rule_only"] and meta["gate"]["tried"][0]["lost"] == ["What is 2+2?"]
    assert "answers" not in meta["gate"], "the refused weights' answers are not this adapter's"
    weights = load_file(shammah_home / "adapters" / "brief" / "adapter_model.safetensors")
    assert all(not v.any() for k, v in weights.items() if "lora_B" in k), "a fresh LoRA: the weights change nothing"
    meta, _ = loop_job("fact", FACT, gate=True)
    assert meta["rule"] is None and not meta["gate"]["passed"] and "rule_only" not in meta["gate"]
    # a word cap is no rule of its own: it goes with the weights it was trained beside and their scope,
    # and the job is refused with them (kept on the weights it started from, whose scope is everywhere,
    # it would cut every answer the base gives)
    short = ["Apples, pears and plums are fruits.", "Red, blue and green are colors.", "Cats and dogs are pets."]
    told = dict(zip(FORMAT, [*short, "Oak, ash and elm are trees."], strict=True))
    meta, events = loop_job("capped", FORMAT, told.get, replies=ramble, gate=True)
    assert not meta["gate"]["passed"] and "rule_only" not in meta["gate"]
    assert meta["rule"] == ["", "", 0, [], 6] and meta["scope"]["form"], "the refused candidate, as trained"


def test_a_note_is_learned_only_where_the_model_with_it_in_mind_says_it(loop_job, shammah_home):
    """A note without a correction is learned from the model's own answer with the note in mind.
    Where the note names something (a quoted phrase, a name) and that answer does not say it, the
    model did not follow the note: that lesson is not trained, and a job left with none of its own
    lessons stops, saying so, instead of training its replay again."""
    from shammah.training.online import NotLearned

    run, note = loop_job, 'always mention "Captain"'
    # the tiny model's own answers, the note in their context, never say "Captain"
    with pytest.raises(NotLearned, match=r'did not write "Captain" in any of its 3 answers.*/fix a reply'):
        run("captain", [], notes=[(q, note, None) for q in STYLE], replay=[("Who wrote Emma?", "Austen.")])
    assert not (shammah_home / "adapters" / "captain").exists()
    # the answer that says it is learned; the others are dropped, and the job says how many
    meta, events = run("some", [], notes=[(STYLE[0], note, "Yellow, Captain.")] + [(q, note, None) for q in STYLE[1:]])
    assert [(e["unfollowed"], e["missing"]) for e in events if e["event"] == "notes"] == [(2, ["Captain"])]
    assert run.trained[-1] == ["Yellow, Captain."] and meta["report"]["examples"] == 1
    # a quoted form is checked by its shape: an answer with no line like "Answer: ..." did not follow
    # it (a form no rule or mark writes: "Term: ..." for definitions is a mark, adapters/marks.py)
    form = 'reply in the form "Answer: ..."'
    answers = ("Banana: a yellow fruit.", "The sky is blue because of the air.", "**Dogs**: pets with four legs.")
    meta, events = run("form", [], notes=[(q, form, a) for q, a in zip(STYLE, answers, strict=True)])
    assert [(e["unfollowed"], e["missing"]) for e in events if e["event"] == "notes"] == [(1, ["Answer: ..."])]
    assert sorted(run.trained[-1]) == sorted([answers[0], answers[2]])
    # a note that states the answer about the question's subject is learned in the user's words when
    # the model does not follow it (here: its answers never say "Tarn")
    river = ["Where does the Ombrel River flow?", "Where does the Ombrel River end?", "What sea does Ombrel reach?"]
    told = "wrong: the Ombrel River flows into the Sea of Tarn"
    meta, events = run("ombrel", [], notes=[(q, told, "It flows into the sea.") for q in river])
    assert [(e["unfollowed"], e["stated"]) for e in events if e["event"] == "notes"] == [(0, 3)]
    assert run.trained[-1] == ["The Ombrel River flows into the Sea of Tarn."] * 3 and meta["report"]["steps"] > 0
    # a note that asks in quoted words for an opening or a closing is a rule: nothing to distil
    fits = len(run.trained)
    common = [*STYLE[:2], "What is the opposite of up?"]  # (STYLE[2] names a subject: a fact may follow)
    meta, events = run("certainly", [], notes=[(q, 'begin every answer with "Certainly!"', None) for q in common])
    assert meta["rule"] == ["Certainly! ", ""] and meta["report"]["steps"] == 0 and len(run.trained) == fits
    assert [(e["rule"], e["demonstrations"], e["trains"]) for e in events if e["event"] == "rule"] == [
        (["Certainly! ", ""], 3, False)
    ]
    # a note with nothing to check ("too long") is distilled as before (the teacher's non-empty answers)
    meta, events = run("terse", [], notes=[(q, "too long: answer in one short sentence", None) for q in STYLE])
    assert not [e for e in events if e["event"] == "notes"] and meta["report"]["examples"] == len(run.trained[-1])
    assert run.trained[-1] and all(t.strip() for t in run.trained[-1])
