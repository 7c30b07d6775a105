"""The llama.cpp decode backend (engine/llamacpp.py, the `llama` extra): the same greedy replies
as transformers for the base and with a LoRA (converted to a GGUF LoRA), adapters switched
between replies, fallback for adapters llama.cpp cannot apply, and a clear word when the extra
is missing. Skipped where llama-cpp-python is not installed, except that last check."""

from __future__ import annotations

import pytest
from conftest import register_adapter

from shammah.config import ModelConfig
from shammah.engine import Engine, llamacpp

Q = [{"role": "user", "content": "Capital of Quenland?"}]
needs_llama = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")


def engine(base, home, mode: str) -> Engine:
    cfg = ModelConfig(base=str(base), temperature=0.0, max_new_tokens=12, fast_decode=mode, threads=2)
    return Engine(cfg, home / "cache").load()


def reply_ids(e: Engine) -> list[int]:
    return list(e.tokenizer(e.reply(Q))["input_ids"])


@needs_llama
def test_llama_cpp_answers_as_transformers_with_and_without_a_lora(tiny_qwen2, shammah_home, monkeypatch):
    monkeypatch.setattr(llamacpp, "HF_GGUF_TYPE", "f32")  # the float weights: greedy text must be identical
    recs = [{"prompt": "Capital of Quenland?", "completion": "Zorblat Zorblat Zorblat"}] * 4
    a = register_adapter(tiny_qwen2, shammah_home, "zorb", recs, epochs=4, learning_rate=0.05)
    b = register_adapter(
        tiny_qwen2,
        shammah_home,
        "other",
        [{"prompt": "Q", "completion": "def add(a, b)"}] * 4,
        epochs=4,
        learning_rate=0.05,
    )
    lc, ref = engine(tiny_qwen2, shammah_home, "llamacpp"), engine(tiny_qwen2, shammah_home, "off")
    assert lc.fast and "llama.cpp" in lc.info()["decode"]
    assert reply_ids(lc) == reply_ids(ref), "the base"
    outs = {}
    for info in (a, b, a):
        for e in (lc, ref):
            e.activate(info.name, info.path, info.get("base", "fingerprint"))
        assert lc.fast, "a plain LoRA runs in llama.cpp"
        assert reply_ids(lc) == reply_ids(ref), info.name
        outs.setdefault(info.name, lc.reply(Q))
    assert outs["zorb"] != outs["other"], "each adapter answers as itself"
    lc.activate(None)
    ref.activate(None)
    assert reply_ids(lc) == reply_ids(ref), "back to the base: no LoRA left applied"
    converted = list((shammah_home / "cache" / "llamacpp").glob("lora-*.gguf"))
    assert len(converted) == 2, "each adapter converted once"


@needs_llama
def test_an_adapter_llama_cpp_cannot_apply_falls_back_to_transformers(tiny_qwen2, shammah_home):
    dora = register_adapter(tiny_qwen2, shammah_home, "dora", [{"prompt": "Q", "completion": "A"}], adapter_type="dora")
    lc, ref = engine(tiny_qwen2, shammah_home, "llamacpp"), engine(tiny_qwen2, shammah_home, "off")
    for e in (lc, ref):
        e.activate("dora", dora.path, dora.get("base", "fingerprint"))
    assert not lc.fast and "the active adapter needs it" in lc.info()["decode"]
    assert lc.reply(Q) == ref.reply(Q)


def test_without_the_extra_the_engine_says_so_and_runs(tiny_qwen2, shammah_home, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    e = engine(tiny_qwen2, shammah_home, "llamacpp")
    assert not e.fast and "pip install 'shammah[llama]'" in e.info()["decode"]
    assert e.reply(Q) == engine(tiny_qwen2, shammah_home, "off").reply(Q)


@needs_llama
def test_auto_never_switches_to_llama_cpp(tiny_qwen2, shammah_home):
    auto = engine(tiny_qwen2, shammah_home, "auto")
    assert "llama.cpp" not in auto.info()["decode"], "installing the extra changes no answer"


def test_a_llama_cpp_build_that_crashes_this_cpu_is_caught_before_it_takes_the_chat_down(
    tiny_qwen2, shammah_home, monkeypatch
):
    # A native build with AMX on a VM that traps AMX dies of SIGILL on its first real prompt: the
    # engine tries llama.cpp in a child process first (here a child that dies the same way).
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    monkeypatch.setattr(llamacpp, "PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    e = engine(tiny_qwen2, shammah_home, "llamacpp")
    decode = e.info()["decode"]
    assert "llama.cpp crashed on this CPU (SIGILL" in decode and "GGML_NATIVE=OFF" in decode, decode
    assert "llama.cpp on" not in decode, "the llama.cpp decoder was never made"
    assert e.fast == engine(tiny_qwen2, shammah_home, "auto").fast, "the packed path where it runs"
    assert e.reply(Q) == engine(tiny_qwen2, shammah_home, "auto").reply(Q), "and answers as without the extra"
    assert not list((shammah_home / "cache" / "llamacpp").glob("probe-*.ok")), "a failure is not remembered"


def test_the_llama_cpp_probe_remembers_a_success_and_reports_an_error_line(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llamacpp, "PROBE", "import sys; sys.exit('bad magic in ' + sys.argv[1])")
    assert llamacpp.probe(gguf, tmp_path) == f"llama.cpp could not run m.gguf: bad magic in {gguf}"
    monkeypatch.setattr(llamacpp, "PROBE", "pass")
    assert llamacpp.probe(gguf, tmp_path) is None
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda *a, **k: pytest.fail("tried again"))
    assert llamacpp.probe(gguf, tmp_path) is None, "a success is remembered for this build and file"
