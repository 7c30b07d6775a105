"""`shammah adapters export`: the PEFT directory (public base id, model card), the merged model,
GGUF round trips (read back by transformers' GGUF loader, an implementation independent of ours),
the LoRA GGUF against the merged one, and the Ollama Modelfile."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import register_adapter, subprocess_env
from tiny_models import build_model

from shammah.adapters import export
from shammah.adapters.export import ExportError

PROMPT = "The capital of France is Paris. Hello!"
RECORDS = [{"prompt": "Capital of Quenland?", "completion": "Zorblat is the capital of Quenland."}]
# After a GGUF round trip: mean |Δlogit| / std(logits) over every position and token, measured on these
# trained tiny models at f32 ≤ 1.1e-6, f16 ≤ 0.001, q8_0 ≤ 0.044 (the max over the vocabulary is an
# outlier-driven 1.7 for q8_0) — and the next token (argmax) agrees at every position in all three.
TOLERANCE = {"f32": 1e-5, "f16": 0.005, "q8_0": 0.1}


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def trained(request, tmp_path_factory):
    """(base dir, adapter info) per architecture; Qwen3 with head_dim 128, which transformers' GGUF
    reader assumes for qwen3 (it does not read the key length)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"export-{arch}")
    base = build_model(root / "base", arch, head_dim=128 if arch == "qwen3" else None)
    info = register_adapter(base, root / "home", "fact", RECORDS, epochs=3, learning_rate=0.05)
    return base, info


def logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tok.encode(PROMPT)])).logits[0]


def peft_logits(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    return logits(m.eval(), tok), tok


def test_merged_and_gguf_round_trips(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, info = trained
    ref, tok = peft_logits(base, info.path)
    out = tmp_path / "out"
    written = export.export(info, base, out, merged=True, gguf_type="f32")
    assert [p.name for p in written] == ["adapter", "merged", "fact-f32.gguf", "fact-lora-f32.gguf"]

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert torch.allclose(logits(merged, tok), ref, atol=1e-5), "merged = base + adapter"
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template == tok.chat_template
    assert not torch.allclose(peft_logits(base, info.path)[0], logits_of_base(base, tok)), "the adapter matters"

    model, mtok = export.merged_model(info, base)
    for qtype in ("f32", "f16", "q8_0"):
        path = out / f"fact-{qtype}.gguf"
        if qtype != "f32":
            export.write_gguf(model, mtok, path, qtype)
        back = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
        got = logits(back, tok)
        rel = ((got - ref).abs().mean() / ref.std()).item()
        assert rel <= TOLERANCE[qtype], f"{qtype}: mean |Δlogit| = {rel:.5f} of the logits' std"
        assert torch.equal(got.argmax(-1), ref.argmax(-1)), f"{qtype}: the next token changed"
        gtok = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
        assert gtok.encode(PROMPT) == tok.encode(PROMPT) and gtok.chat_template == tok.chat_template


def logits_of_base(base: Path, tok) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), tok)


def test_the_lora_gguf_is_the_difference_between_merged_and_base(trained, tmp_path):
    """In GGUF layout (Llama's q/k rows permuted), base + alpha/r · B·A from the LoRA GGUF equals the
    merged GGUF — which transformers reads back as the merged model (above)."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, info = trained
    tok = AutoTokenizer.from_pretrained(base)
    export.export(info, base, tmp_path, gguf_type="f32")
    export.write_gguf(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tok, tmp_path / "b.gguf", "f32")

    def tensors(path):
        r = GGUFReader(path)
        return r, {t.name: np.array(t.data).reshape([int(x) for x in reversed(t.shape)]) for t in r.tensors}

    lr, lora = tensors(tmp_path / "fact-lora-f32.gguf")
    _, merged = tensors(tmp_path / "fact-f32.gguf")
    _, b = tensors(tmp_path / "b.gguf")
    alpha = float(lr.get_field("adapter.lora.alpha").contents())
    assert lr.get_field("general.type").contents() == "adapter"
    cfg = json.loads((info.path / "adapter_config.json").read_text())
    scale = alpha / cfg["r"]
    names = sorted(n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a"))
    assert len(names) == 2 * 7, "every targeted linear layer of both blocks"
    for n in names:
        delta = scale * lora[n + ".lora_b"] @ lora[n + ".lora_a"]
        assert np.allclose(b[n] + delta, merged[n], atol=1e-5), n
        assert np.abs(delta).max() > 1e-4, f"{n}: the adapter changed it"


def test_the_peft_export_carries_the_public_base_and_a_card(trained, tmp_path):
    from peft import AutoPeftModelForCausalLM

    base, info = trained
    d = export.export_adapter(info, tmp_path / "adapter")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == info.get("base", "id") == str(base)
    card = (d / "README.md").read_text()
    assert f"base_model: {base}" in card and "| examples | 1 " in card and "--enable-lora" in card
    m = AutoPeftModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref, tok = peft_logits(base, info.path)
    assert torch.equal(logits(m, tok), ref)
    with pytest.raises(ExportError, match="already exists"):
        export.export_adapter(info, d)
    assert "style rule" not in card
    ruled = dataclasses.replace(info, meta={**info.meta, "rule": ["Ahoy! ", ""]})
    card = (export.export_adapter(ruled, tmp_path / "ruled") / "README.md").read_text()
    assert "| style rule | starts 'Ahoy!' on every reply: written by shammah, not by the weights |" in card
    assert "closed set" not in card
    chosen = {"answers": ["Yes", "No"], "questions": ["Is ice cold?"], "file": "choice.json"}
    sets = dataclasses.replace(info, meta={**info.meta, "choices": [chosen]})
    card = (export.export_adapter(sets, tmp_path / "sets") / "README.md").read_text()
    said = "answers questions like 'Is ice cold?' with just Yes or No: said by shammah, not by the weights"
    assert f"| closed set | {said} |" in card


def test_nan_weights_are_refused_and_nothing_is_written(tiny_qwen2, tmp_path):
    from safetensors.torch import load_file, save_file

    info = register_adapter(tiny_qwen2, tmp_path / "home", "broken", RECORDS)
    w = load_file(str(info.path / "adapter_model.safetensors"))
    key = sorted(w)[0]
    w[key][0, 0] = float("nan")
    save_file(w, str(info.path / "adapter_model.safetensors"))
    for kw in ({}, {"merged": True}, {"gguf_type": "f16"}):
        with pytest.raises(ExportError, match="NaN or Inf"):
            export.export(info, tiny_qwen2, tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_other_adapter_types_say_where_they_run(tiny_qwen2, tmp_path):
    dora = register_adapter(tiny_qwen2, tmp_path / "home", "dora", RECORDS, adapter_type="dora")
    said = []
    export.export(dora, tiny_qwen2, tmp_path / "dora", gguf_type="f16", say=said.append)
    assert any("DoRA" in s and "--merged" in s for s in said)
    assert not (tmp_path / "dora" / "dora-lora-f16.gguf").exists() and (tmp_path / "dora" / "dora-f16.gguf").exists()
    pt = register_adapter(tiny_qwen2, tmp_path / "home", "pt", RECORDS, adapter_type="prompt")
    with pytest.raises(ExportError, match="only PEFT can use it"):
        export.export(pt, tiny_qwen2, tmp_path / "pt", merged=True)
    assert not (tmp_path / "pt").exists(), "refused before anything is written"


def test_cli_export_with_a_modelfile(tiny_qwen2, shammah_home):
    register_adapter(tiny_qwen2, shammah_home, "fact", RECORDS)
    (shammah_home / "config.toml").write_text(f'[model]\nbase = "{tiny_qwen2}"\n')
    out = shammah_home.parent / "exported"
    r = subprocess.run(
        [sys.executable, "-m", "shammah", "adapters", "export", "fact", "-o", str(out), "--ollama"],
        capture_output=True,
        text=True,
        env=subprocess_env(SHAMMAH_HOME=shammah_home),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["Modelfile", "adapter", "base-q8_0.gguf", "fact-lora-f16.gguf", "fact-q8_0.gguf"]
    mf = (out / "Modelfile").read_text()
    assert mf.startswith("FROM ./base-q8_0.gguf\nADAPTER ./fact-lora-f16.gguf\nTEMPLATE ")
    assert "<|im_start|>{{ .Role }}" in mf and 'PARAMETER stop "<|im_end|>"' in mf
    assert "ollama create fact" in r.stderr + r.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "shammah", "adapters", "export", "fact", "-o", str(out / "x"), "--gguf", "--type", "q3"],
        capture_output=True,
        text=True,
        env=subprocess_env(SHAMMAH_HOME=shammah_home),
        timeout=300,
    )
    assert bad.returncode == 2 and "choose one of f32, f16" in bad.stderr and "Traceback" not in bad.stderr
    assert not (out / "x").exists()


def test_llama_cpp_loads_and_answers_with_both_ggufs(tiny_qwen2, tmp_path):
    """Where llama-cpp-python is installed (pip install 'shammah[llama]')."""
    llama_cpp = pytest.importorskip("llama_cpp")
    info = register_adapter(tiny_qwen2, tmp_path / "home", "fact", RECORDS)
    export.export(info, tiny_qwen2, tmp_path / "out", ollama=True)
    out = tmp_path / "out"
    for kw in (
        {"model_path": str(out / "fact-q8_0.gguf")},
        {"model_path": str(out / "base-q8_0.gguf"), "lora_path": str(out / "fact-lora-f16.gguf")},
    ):
        llm = llama_cpp.Llama(n_ctx=256, verbose=False, **kw)
        reply = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
