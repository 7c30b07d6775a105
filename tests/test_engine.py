import threading

import pytest

from shammah.config import ModelConfig
from shammah.engine import Engine
from shammah.errors import ModelError


def engine_for(path, tmp_path, **kw) -> Engine:
    cfg = ModelConfig(base=str(path), temperature=0.0, max_new_tokens=kw.pop("max_new_tokens", 12), **kw)
    return Engine(cfg, tmp_path / "cache").load()


@pytest.fixture(params=["qwen2", "qwen3"])
def tiny(request, tiny_qwen2, tiny_qwen3):
    return {"qwen2": tiny_qwen2, "qwen3": tiny_qwen3}[request.param]


def test_stream_matches_plain_generate(tiny, tmp_path):
    import torch

    eng = engine_for(tiny, tmp_path, dtype="float32")
    msgs = [{"role": "user", "content": "Hello there"}]
    chunks = list(eng.stream(msgs))
    assert chunks[-1].finish_reason in ("length", "stop")
    assert all(c.finish_reason is None for c in chunks[:-1])
    streamed = "".join(c.text for c in chunks)
    ids = torch.tensor([eng.encode(msgs)])
    with torch.inference_mode():
        out = eng.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.0,
            pad_token_id=eng.tokenizer.pad_token_id,
        )
    expected = eng.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert streamed == expected
    assert chunks[-1].new_tokens == out.shape[1] - ids.shape[1]
    assert chunks[-1].tokens_per_s > 0


def test_greedy_is_deterministic_and_seed_reproduces_sampling(tiny_qwen2, tmp_path):
    eng = engine_for(tiny_qwen2, tmp_path)
    msgs = [{"role": "user", "content": "Paris"}]
    assert eng.reply(msgs) == eng.reply(msgs)
    p = eng.gen_params(temperature=1.0, seed=7, max_new_tokens=16)
    assert eng.reply(msgs, p) == eng.reply(msgs, p)


def test_sampling_comes_from_config_then_the_model_then_a_fallback(tiny_qwen2, tmp_path):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    (model / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": 2})
    )
    eng = Engine(ModelConfig(base=str(model), top_p=0.5), tmp_path / "cache").load()
    assert eng.sampling() == {
        "temperature": (0.6, "model"),
        "top_p": (0.5, "config"),
        "top_k": (20, "model"),
        "repetition_penalty": (1.0, "default"),
    }
    p = eng.gen_params(temperature=0.0)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 0.5, 20, 1.0)
    assert "temperature 0.6 (the model's generation_config)" in eng.info()["sampling"]
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert Engine(ModelConfig(base=str(model)), tmp_path / "cache").load().sampling()["temperature"] == (0.0, "model")


def test_interrupt_stops_the_reply(tiny_qwen2, tmp_path):
    eng = engine_for(tiny_qwen2, tmp_path, max_new_tokens=400)
    stop = threading.Event()
    n = 0
    for chunk in eng.stream([{"role": "user", "content": "hi"}], stop=stop):
        n += 1
        if n == 3:
            stop.set()
        last = chunk
    assert last.finish_reason == "interrupted"
    assert last.new_tokens < 400


def test_context_is_trimmed_oldest_first(tiny_qwen2, tmp_path):
    eng = engine_for(tiny_qwen2, tmp_path, context_window=120, max_new_tokens=20)
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(10):
        msgs += [
            {"role": "user", "content": f"question {i} about Paris and Tokyo"},
            {"role": "assistant", "content": f"answer {i} about the capital"},
        ]
    msgs.append({"role": "user", "content": "final question"})
    ids, kept = eng.prepare(msgs, 20)
    assert len(ids) <= 100
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "final question"
    assert kept[1]["role"] == "user" and len(kept) < len(msgs)
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1 :], "a contiguous tail of the conversation is kept"


def test_background_load_and_load_errors(tmp_path):
    eng = Engine(ModelConfig(base="Qwen/Qwen2.5-0.5B-Instruct"), tmp_path / "cache")
    eng.start_loading()
    assert eng.wait(60)
    with pytest.raises(ModelError, match="embedded"):
        eng.load()
    assert "failed to load" in eng.info()["state"]


def test_cuda_requested_without_cuda_is_a_clear_error(tiny_qwen2, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="no CUDA device"):
        engine_for(tiny_qwen2, tmp_path, device="cuda")
