"""The fast CPU decode path (engine/fast.py) against transformers' own forward: the architecture
details (GQA, RoPE, Qwen2 biases, Qwen3 q/k norms, the KV cache), LoRA unmerged, the engine's
choice of path, and the fallback when a kernel or an adapter type is not available."""

import shutil

import pytest
import torch
from conftest import register_adapter
from transformers import AutoModelForCausalLM

from shammah.config import ModelConfig
from shammah.engine import Engine, ckernel, fast
from shammah.engine.fast import FastDecoder

IDS = [5, 17, 42, 8, 99, 23, 64, 3, 71, 12, 30, 55]


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@pytest.mark.parametrize("arch", ["tiny_qwen2", "tiny_qwen3"])
@pytest.mark.parametrize("quant", ["int8", "int4", "int4-c"])
def test_fast_logits_follow_the_float_model(arch, quant, request, tmp_path):
    """Token by token through the KV cache, every position's logits point where the float model's
    do; the prompt in one pass (prefill) gives the same last logits as feeding it token by token.
    int4-c: the C int4 matmul (engine/ckernel.py, activations in two int8 passes), for decode's
    single row and the prompt's many."""
    model = _hf(request.getfixturevalue(arch))
    assert fast.unsupported(model) is None
    kernel = None
    if quant == "int4-c":
        kernel, why = ckernel.load(tmp_path)
        if kernel is None or not kernel.has_q4:
            pytest.skip(why or "no integer SIMD for the C int4 matmul on this CPU")
        quant = "int4"
    dec = FastDecoder(model, quant, kernel, c_int4=kernel is not None)
    assert dec.c_base == (kernel is not None)
    with torch.inference_mode():
        ref = model(torch.tensor([IDS])).logits[0]
        prefill = dec.forward(torch.tensor(IDS), 0)
    steps = dec.logits(IDS)
    floor = 0.999 if quant == "int8" else 0.97
    assert _cos(steps, ref).min() > floor, _cos(steps, ref)
    assert (steps.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert _cos(prefill[None], steps[-1:])[0] > 0.999


def test_a_broken_rope_would_be_caught(tiny_qwen2):
    """The check above can fail: positions shifted by one (a classic KV-cache bug) drift away."""
    model = _hf(tiny_qwen2)
    dec = FastDecoder(model, "int8")
    with torch.inference_mode():
        ref = model(torch.tensor([IDS])).logits[0]
        dec.forward(torch.tensor(IDS[:1]), 0)
        shifted = torch.stack([dec.forward(torch.tensor([t]), i + 2) for i, t in enumerate(IDS[1:])])
    assert _cos(shifted, ref[1:]).min() < 0.999


@pytest.mark.parametrize("lora_ops", ["torch", "c"])
def test_lora_unmerged_matches_peft(tiny_qwen2, shammah_home, lora_ops):
    """The LoRA in fp32 torch ops and in the C kernel (bf16, engine/ckernel.py) against PEFT."""
    from peft import PeftModel

    kernel = None
    if lora_ops == "c":
        kernel, why = ckernel.load(shammah_home / "cache")
        if kernel is None:
            pytest.skip(why)
    info = register_adapter(
        tiny_qwen2,
        shammah_home,
        "zorb",
        [{"prompt": "Say something.", "completion": "Zorblat zorblat zorblat."}] * 4,
        epochs=6,
        learning_rate=5e-2,
        rank=8,
        alpha=16,
    )
    base = _hf(tiny_qwen2)
    dec = FastDecoder(base, "int8", kernel)
    plain = dec.logits(IDS)
    peft = PeftModel.from_pretrained(base, str(info.path)).eval()
    with torch.inference_mode():
        ref = peft(torch.tensor([IDS])).logits[0]
    dec.set_lora("zorb", info.path)
    kinds = {type(site) for layer in dec.lora for site in layer.values()}
    assert kinds == ({ckernel.Site} if kernel else {tuple}), kinds
    with_lora = dec.logits(IDS)
    # 0.998: the first position's hidden state reaches ~7 under this adapter, and rounding the
    # kernels' bf16 inputs alone (exact fp32 matmuls otherwise) costs it ~0.03 of logit there
    assert _cos(with_lora, ref).min() > 0.998
    assert (with_lora - ref).abs().max() < 0.1 * (plain - ref).abs().max(), "the adapter is what changed them"
    with torch.inference_mode():  # the prompt in one pass goes through the LoRA's batched layout too
        prefill = dec.forward(torch.tensor(IDS), 0)
    assert _cos(prefill[None], ref[-1:])[0] > 0.999
    dec.set_lora(None, None)
    assert torch.allclose(dec.logits(IDS), plain)

    # a module whose B is zero changes nothing and costs no matmul: a fresh LoRA has none left
    from safetensors.torch import load_file, save_file

    fresh = shammah_home / "fresh"
    shutil.copytree(info.path, fresh)
    weights = load_file(str(fresh / "adapter_model.safetensors"))
    save_file(
        {k: (v * 0 if "lora_B" in k else v) for k, v in weights.items()}, str(fresh / "adapter_model.safetensors")
    )
    layers = fast.load_lora(fresh, len(dec.layers), dec.out_sizes, dec.rows)
    assert all(not layer for layer in layers)
    one = {k: (v * 0 if "lora_B" in k and "layers.0.self_attn.q_proj" not in k else v) for k, v in weights.items()}
    save_file(one, str(fresh / "adapter_model.safetensors"))
    layers = fast.load_lora(fresh, len(dec.layers), dec.out_sizes, dec.rows)
    assert list(layers[0]) == ["qkv"] and not any(layers[1:]), "only layer 0's q_proj is left"


def test_sampling_settings_are_transformers_semantics():
    logits = torch.tensor([0.0, 5.0, 4.9, 1.0])
    assert fast.sampler(0.0, 1.0, 0, 1.0, 0) is None  # greedy: argmax, nothing else per token
    penalised = fast.sampler(0.0, 1.0, 0, 2.0, 0)
    assert penalised([1], logits) == 2  # token 1 was said: 5.0 / 2 < 4.9
    top1 = fast.sampler(1.0, 1.0, 1, 1.0, 7)
    assert {top1([], logits) for _ in range(20)} == {1}
    seeded = [fast.sampler(1.5, 1.0, 0, 1.0, 3)([], logits) for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.fixture
def engine_for(tiny_qwen2, tmp_path):
    def make(**kw):
        return Engine(ModelConfig(base=str(tiny_qwen2), temperature=0.0, max_new_tokens=12, **kw), tmp_path).load()

    return make


MSGS = [{"role": "user", "content": "Say something about rain."}]


def test_the_engine_takes_the_fast_path_and_says_so(engine_for):
    e = engine_for(fast_decode="int8")
    assert e.fast and e.info()["decode"] == "fast path: int8 weights, LoRA unmerged (bf16, C kernel)"
    chunks = list(e.stream(MSGS))
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].new_tokens > 0
    off = engine_for(fast_decode="off")
    assert not off.fast and off.info()["decode"] == "transformers generate (model.fast_decode = off)"
    # int8 on a random model: close to the float path, and the same greedy reply here
    assert e.reply(MSGS) == off.reply(MSGS)


def test_without_the_int4_kernel_auto_falls_back(engine_for, monkeypatch):
    real = fast.kernel_available
    monkeypatch.setattr(fast, "kernel_available", lambda q: q != "int4" and real(q))
    assert engine_for().info()["decode"] == "fast path: int8 weights, LoRA unmerged (bf16, C kernel)"
    monkeypatch.setattr(fast, "kernel_available", lambda q: False)
    e = engine_for()
    assert not e.fast and "no packed int4 CPU kernel" in e.info()["decode"]
    assert e.reply(MSGS)  # transformers answers


def test_adapter_swap_on_the_fast_path_and_dora_falls_back(engine_for, tiny_qwen2, shammah_home):
    recs = [{"prompt": "Say something about rain.", "completion": "Zorblat zorblat zorblat."}] * 4
    lora = register_adapter(tiny_qwen2, shammah_home, "lora", recs, epochs=6, learning_rate=5e-2, rank=8)
    dora = register_adapter(
        tiny_qwen2, shammah_home, "dora", recs, epochs=6, learning_rate=5e-2, rank=8, adapter_type="dora"
    )
    e, ref = engine_for(fast_decode="int8"), engine_for(fast_decode="off")
    base_reply = e.reply(MSGS)
    fp = lora.get("base", "fingerprint")
    secs = e.activate("lora", lora.path, fp)
    ref.activate("lora", lora.path, fp)
    assert e.fast and e._peft is None, "transformers' copy is not loaded while the fast path answers"
    assert e.reply(MSGS) == ref.reply(MSGS) != base_reply and secs < 1.0
    e.activate("dora", dora.path, fp)
    ref.activate("dora", dora.path, fp)
    assert not e.fast and "the active adapter needs it" in e.info()["decode"]
    assert e.reply(MSGS) == ref.reply(MSGS)  # transformers runs DoRA
    e.activate(None)
    assert e.fast and e.reply(MSGS) == base_reply


def _c_kernel(tmp_path):
    kernel, why = ckernel.load(tmp_path)
    if kernel is None or not kernel.has_q4:
        pytest.skip(why or "no integer SIMD for the C int4 matmul on this CPU")
    return kernel


@pytest.mark.parametrize("arch", ["tiny_qwen2", "tiny_qwen3", "tiny_llama"])
def test_the_c_step_follows_the_torch_ops(arch, request, shammah_home):
    """Decode's whole step in one C call (ckernel.Step: norms, q/k/v bias, Qwen3's head norms, RoPE,
    the KV cache, GQA attention, SiLU, the LoRA sites) against the same decoder's torch ops, with
    and without a LoRA, token by token past a prompt filled through torch."""
    kernel = _c_kernel(shammah_home / "cache")
    path = request.getfixturevalue(arch)
    model = _hf(path)
    dec = FastDecoder(model, "int4", kernel, c_int4=True)
    assert dec.step is not None and "one call a token" in dec.label, dec.label
    info = register_adapter(
        path, shammah_home, "zorb", [{"prompt": "Say something.", "completion": "Zorblat zorblat."}] * 4,
        epochs=4, learning_rate=5e-2, rank=8, alpha=16,
    )  # fmt: skip

    def decode(on: bool) -> torch.Tensor:
        step, dec.step = dec.step, dec.step if on else None
        calls = []
        if on:
            run = dec.step.run
            dec.step.run = lambda *a: calls.append(1) or run(*a)
        with torch.inference_mode():
            dec.forward(torch.tensor(IDS[:5]), 0)  # a prompt through torch fills the cache
            out = torch.stack([dec.forward(torch.tensor([t]), 5 + i).clone() for i, t in enumerate(IDS[5:])])
        dec.step = step
        if on:
            del step.run
            assert len(calls) == len(IDS) - 5, "every decode token went through the C step"
        return out

    for lora in (None, info.path):
        dec.set_lora("zorb" if lora else None, lora)
        c, ops = decode(True), decode(False)
        # int8 activations: a value rounded the other way now and then (2-3 layers deep: ~1e-4)
        assert _cos(c, ops).min() > 0.999, _cos(c, ops)
        assert (c.argmax(-1) == ops.argmax(-1)).all()
    with torch.inference_mode():  # and the LoRA is in it: the step with it differs from without
        dec.set_lora(None, None)
        plain = decode(True)
    assert _cos(plain, c).min() < 0.999


@pytest.mark.parametrize(
    "sabotage",
    [
        ("const int qd = nh * hd, kd = nkv * hd, grp = nh / nkv;", "const int qd = nh * hd, kd = nkv * hd, grp = nh;"),
        ("v[2 * i + 1] = a * s + b * c;", "v[2 * i + 1] = a * s - b * c;"),
    ],
    ids=["gqa", "rope"],
)
def test_a_wrong_c_step_is_not_used(tiny_qwen2, tmp_path, monkeypatch, sabotage):
    """The decoder checks the C step against its torch ops when it is built: one attending every
    query head to the first KV head, or rotating the wrong way, is refused, and decode stays right."""
    broken = ckernel.SOURCE.replace(*sabotage)
    assert broken != ckernel.SOURCE
    monkeypatch.setattr(ckernel, "SOURCE", broken)
    kernel = _c_kernel(tmp_path)
    model = _hf(tiny_qwen2)
    dec = FastDecoder(model, "int4", kernel, c_int4=True)
    assert dec.step is None and dec._cstep is not None and "one call" not in dec.label
    with torch.inference_mode():
        ref = model(torch.tensor([IDS])).logits[0]
    assert _cos(dec.logits(IDS), ref).min() > 0.97


def test_a_matmul_without_a_c_copy_keeps_decode_in_torch_ops(tiny_qwen2, tmp_path, monkeypatch):
    """A weight the C kernel cannot take (rows not in blocks of 8: here o is refused) stays with
    torch's int4 kernel, the others in C; the whole-step C call, which needs them all, is not
    built, and the logits still follow the float model."""
    kernel = _c_kernel(tmp_path)
    model = _hf(tiny_qwen2)
    cfg = model.config
    q4 = kernel.q4
    monkeypatch.setattr(
        kernel,
        "q4",
        lambda q, *a: None if q.shape[1] == cfg.hidden_size and q.shape[0] == cfg.hidden_size else q4(q, *a),
    )
    dec = FastDecoder(model, "int4", kernel, c_int4=True)
    assert dec.layers[0].o.c is None and dec.layers[0].qkv.c is not None
    assert not dec.c_base and dec.step is None and "C kernel" not in dec.label.split(",")[0]
    with torch.inference_mode():
        ref = model(torch.tensor([IDS])).logits[0]
    assert _cos(dec.logits(IDS), ref).min() > 0.97


def test_a_partial_lora_stays_in_the_c_kernel(tiny_qwen2, shammah_home):
    """A LoRA on q and v only (PEFT's default targets for many models) or with ranks that differ
    between the parts of a fused matmul: the missing parts and lower ranks are zeros in the C site,
    so it matches PEFT, and decode keeps the whole-step C call (a torch-ops site would take every
    token out of it, ~3x slower)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    kernel = _c_kernel(shammah_home / "cache")
    info = register_adapter(
        tiny_qwen2, shammah_home, "qv", [{"prompt": "Say something.", "completion": "Zorblat zorblat zorblat."}] * 4,
        epochs=6, learning_rate=5e-2, rank=8, alpha=16, target_modules=["q_proj", "v_proj"],
    )  # fmt: skip
    base = _hf(tiny_qwen2)
    dec = FastDecoder(base, "int4", kernel, c_int4=True)
    assert dec.step is not None
    plain = dec.logits(IDS)
    with torch.inference_mode():
        ref = PeftModel.from_pretrained(_hf(tiny_qwen2), str(info.path)).eval()(torch.tensor([IDS])).logits[0]
    dec.set_lora("qv", info.path)
    assert dec._step_lora and all(type(s) is ckernel.Site for ly in dec.lora for s in ly.values())
    with_lora = dec.logits(IDS)
    assert _cos(with_lora, ref).min() > 0.97
    assert (with_lora.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert _cos(with_lora, plain).min() < 0.99, "the adapter changed them"

    # v at rank 4 beside q at rank 8: the padded C site against the torch ops' block-diagonal B
    mixed = shammah_home / "mixed"
    shutil.copytree(info.path, mixed)
    w = load_file(str(mixed / "adapter_model.safetensors"))
    w = {
        k: (v[:4] if "v_proj.lora_A" in k else v[:, :4] if "v_proj.lora_B" in k else v).contiguous()
        for k, v in w.items()
    }
    save_file(w, str(mixed / "adapter_model.safetensors"))
    c_sites = fast.load_lora(mixed, len(dec.layers), dec.out_sizes, dec.rows, kernel)
    ops = fast.load_lora(mixed, len(dec.layers), dec.out_sizes, dec.rows)
    x = torch.randn(3, base.config.hidden_size)
    zero = _Zero(sum(dec.out_sizes[f"self_attn.{m}_proj"] for m in "qkv"))
    for c_layer, ops_layer in zip(c_sites, ops, strict=True):
        assert type(c_layer["qkv"]) is ckernel.Site and type(ops_layer["qkv"]) is tuple
        want = FastDecoder._mm(zero, ops_layer, "qkv", x)
        got = FastDecoder._mm(zero, c_layer, "qkv", x)
        assert want.abs().max() > 0 and ((got - want).norm() / want.norm()) < 1e-2  # bf16 weights in C


class _Zero:
    """A base matmul with ``n`` outputs that adds nothing: what is left of FastDecoder._mm is the LoRA."""

    def __init__(self, n: int):
        self.n = n

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.n)
