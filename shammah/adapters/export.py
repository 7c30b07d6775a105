"""Adapters out of shammah: a PEFT directory for vLLM/PEFT, a merged transformers model, GGUF
files for llama.cpp (the merged model, and the adapter alone for ``--lora``), and an Ollama
Modelfile.

GGUF is written with the ``gguf`` library (the writer llama.cpp's own converters use) for the
architectures shammah runs: Llama (the embedded SmolLM2), Qwen2 and Qwen3. By hand here, because
llama.cpp's ``convert_hf_to_gguf.py`` is not on PyPI (it ships only inside llama.cpp's source);
what it does for these three is small and follows it: tensor names from gguf's name map, Llama's
q/k rows permuted back to GGUF's rotary layout, the BPE vocabulary with token types, merges,
special ids and chat template, 1-D tensors kept in F32. gguf's quantizers give F32, F16, BF16,
Q8_0, Q4_0/1 and Q5_0/1 (no k-quants).

Every tensor is checked for NaN/Inf before a file is written, and every output appears whole or
not at all (a temp file or staging directory renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from shammah.adapters.choice import describe_recorded
from shammah.adapters.registry import AdapterError, AdapterInfo
from shammah.adapters.rule import Rule
from shammah.errors import ShammahError

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank
ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
PRE_TOKENIZER = {"qwen2": "qwen2", "qwen3": "qwen2"}  # llama.cpp's names for these families' pre-tokenizers
CHATML_OLLAMA = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


class ExportError(ShammahError):
    """An adapter or model that cannot be exported as asked."""


# --- where each adapter type can run --------------------------------------------------------------


def engines_note(adapter_cfg: dict) -> str | None:
    """A line on which engines can serve this adapter, when it is not a plain LoRA."""
    kind = adapter_cfg.get("peft_type")
    if kind == "LORA" and adapter_cfg.get("use_dora"):
        return (
            "a DoRA adapter: PEFT loads it as it is; vLLM and llama.cpp serve only plain LoRA, so export it "
            "--merged (and --gguf) for them"
        )
    if kind == "IA3":
        return "an IA3 adapter: PEFT loads it; for vLLM, llama.cpp or Ollama export it --merged (and --gguf)"
    if kind == "PROMPT_TUNING":
        return (
            "a prompt-tuning adapter: only PEFT can use it (virtual tokens are not weights to merge); "
            "vLLM, llama.cpp and Ollama cannot serve it"
        )
    return None


# --- atomic outputs ------------------------------------------------------------------------------
class _Staged:
    """A directory built under a hidden name beside ``target`` and renamed into place."""

    def __init__(self, target: Path):
        self.target = Path(target)
        if self.target.exists():
            raise ExportError(f"{self.target} already exists; choose another -o or remove it")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.tmp-"))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        os.chmod(self.path, 0o755)  # an export is meant to be shared: not the home's 0700
        os.rename(self.path, self.target)


def check_finite(named) -> None:
    """Refuse NaN/Inf anywhere before anything is written: (name, tensor) pairs."""
    import torch

    for name, t in named:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ExportError(f"tensor {name} holds NaN or Inf; the adapter is damaged — retrain it")


# --- the PEFT directory, with a model card ---------------------------------------------------------
def model_card(info: AdapterInfo, cfg: dict) -> str:
    rep = info.get("report", default={}) or {}
    hp = info.get("hyperparameters", default={}) or {}
    gate = info.get("gate") or {}
    base = info.get("base", "id") or cfg.get("base_model_name_or_path")
    r = cfg.get("r")
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [shammah, lora]",
        "---",
        f"# {info.name}",
        "",
        f"A {str(cfg.get('peft_type', '')).lower()} adapter for `{base}`, trained with shammah.",
        "",
        "| | |",
        "|---|---|",
        f"| method | {info.get('method')} |",
        f"| examples | {rep.get('examples')} (dataset sha256 {info.get('dataset_hash')}) |",
        f"| epochs, learning rate | {hp.get('epochs')}, {hp.get('learning_rate')} |",
        f"| rank, alpha, targets | {r}, {cfg.get('lora_alpha')}, {', '.join(sorted(cfg.get('target_modules') or []))} |",
        f"| final train loss | {rep.get('final_train_loss')} |",
        f"| eval loss | {rep.get('final_eval_loss')} |",
    ]
    if gate:
        lines.append(f"| gate | {'passed' if gate.get('passed') else 'rejected'} {gate.get('controls', '')} |")
    if rule := Rule.recorded(info.get("rule")):
        lines.append(f"| style rule | {rule.on_replies()}: written by shammah, not by the weights |")
    for said in describe_recorded(info.get("choices")):
        lines.append(f"| closed set | {said}: said by shammah, not by the weights |")
    for name, res in (info.get("eval") or {}).items():
        metrics = ", ".join(f"{k} {v}" for k, v in res.get("metrics", {}).items())
        lines.append(f"| eval on {name} | {metrics} |")
    lines += ["", "## Use it", "", "```python", "from peft import AutoPeftModelForCausalLM"]
    lines += [f'model = AutoPeftModelForCausalLM.from_pretrained("{info.name}")', "```", ""]
    note = engines_note(cfg)
    if note:
        lines += [f"Note: {note}.", ""]
    else:
        flag = f" --max-lora-rank {max(r, VLLM_MAX_LORA_RANK)}" if isinstance(r, int) and r > VLLM_MAX_LORA_RANK else ""
        lines += [f"vLLM: `vllm serve {base} --enable-lora --lora-modules {info.name}=./adapter{flag}`", ""]
    return "\n".join(lines)


def export_adapter(info: AdapterInfo, target: Path) -> Path:
    """The PEFT directory: weights, adapter_config.json (the base's public id) and a model card."""
    from shammah.adapters.package import check_adapter_dir

    cfg = check_adapter_dir(info.path)
    base_id = info.get("base", "id")
    with _Staged(target) as d:
        from safetensors.torch import load_file

        check_finite(load_file(str(info.path / "adapter_model.safetensors")).items())
        shutil.copyfile(info.path / "adapter_model.safetensors", d / "adapter_model.safetensors")
        if base_id:
            cfg = {**cfg, "base_model_name_or_path": base_id}
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        (d / "README.md").write_text(model_card(info, cfg))
    return target


# --- merged ----------------------------------------------------------------------------------------
def merged_model(info: AdapterInfo, base_dir: Path):
    """(merged model in float32, tokenizer): base + adapter, folded into plain weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shammah.adapters.package import check_adapter_dir

    cfg = check_adapter_dir(info.path)
    if cfg.get("peft_type") == "PROMPT_TUNING":
        raise ExportError(f"{info.name}: {engines_note(cfg)}")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(info.path)).merge_and_unload()
    check_finite(model.state_dict().items())
    return model.eval(), AutoTokenizer.from_pretrained(base_dir)


def save_merged(model, tok, target: Path) -> Path:
    """A standard transformers directory (safetensors, config, tokenizer with chat template)."""
    with _Staged(target) as d:
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
    return target


# --- GGUF ------------------------------------------------------------------------------------------
def _arch(config) -> tuple[str, object]:
    import gguf

    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise ExportError(
            f"GGUF export knows llama, qwen2 and qwen3 models, not {kind!r}; export --merged and convert it "
            "with llama.cpp's convert_hf_to_gguf.py"
        )
    return kind, getattr(gguf.MODEL_ARCH, ARCHS[kind])


def _permute(w, n_head: int):
    """HF Llama's q/k rows → GGUF's rotary layout (llama.cpp's convert_hf_to_gguf does the same)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(kind: str, key: str, config) -> int | None:
    """For Llama's q/k projections, the head count their rows are permuted by (else None)."""
    if kind != "llama":
        return None
    if key.endswith("q_proj.weight"):
        return config.num_attention_heads
    if key.endswith("k_proj.weight"):
        return config.num_key_value_heads
    return None


def _qtype(name: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, name.upper())


def _file_type(name: str):
    import gguf

    f = gguf.LlamaFileType
    return {
        "f32": f.ALL_F32,
        "f16": f.MOSTLY_F16,
        "bf16": f.MOSTLY_BF16,
        "q8_0": f.MOSTLY_Q8_0,
        "q4_0": f.MOSTLY_Q4_0,
        "q4_1": f.MOSTLY_Q4_1,
        "q5_0": f.MOSTLY_Q5_0,
        "q5_1": f.MOSTLY_Q5_1,
    }[name]


def _vocab(tok, vocab_size: int):
    """Tokens and their types, as llama.cpp's converter lists a BPE vocabulary."""
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _atomic_file(target: Path):
    target = Path(target)
    if target.exists():
        raise ExportError(f"{target} already exists; choose another -o or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def _gguf_writer(target: Path, arch):
    """A GGUFWriter on a temp file beside ``target``; written out and renamed into place when the
    block ends without error, removed otherwise."""
    import gguf

    tmp = _atomic_file(target)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        yield w
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _add_tensor(writer, name: str, t, qtype_name: str, permute_heads: int | None = None) -> None:
    import gguf
    import numpy as np

    a = t.detach().to("cpu").float().numpy()
    if permute_heads:
        a = _permute(a, permute_heads)
    want = _qtype(qtype_name)
    if a.ndim == 1 or name.endswith("_norm.weight"):  # norms and biases stay F32, as llama.cpp keeps them
        want = gguf.GGMLQuantizationType.F32
    if want not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        block = gguf.GGML_QUANT_SIZES[want][0]
        if a.shape[-1] % block:  # rows that don't fill whole blocks: F16, as the converter falls back
            want = gguf.GGMLQuantizationType.F16
    if want == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    elif want == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, np.ascontiguousarray(a, dtype=np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(a, want), raw_dtype=want)


def write_gguf(model, tok, target: Path, qtype: str = "f16", *, name: str = "", pre: str | None = None) -> Path:
    """A GGUF of ``model`` (a transformers causal LM of a known architecture) for llama.cpp/Ollama."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise ExportError(f"--type {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    c = model.config
    kind, arch = _arch(c)
    state = model.state_dict()
    check_finite(state.items())
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    with _gguf_writer(target, arch) as w:
        w.add_name(name or target.stem)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_freq_base(getattr(c, "rope_theta", None) or (c.rope_parameters or {}).get("rope_theta", 10000.0))
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(_file_type(qtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokens, types = _vocab(tok, c.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or PRE_TOKENIZER.get(kind, "default"))
        w.add_token_list(tokens)
        w.add_token_types(types)
        with tempfile.TemporaryDirectory() as tdir:
            tok.save_pretrained(tdir)  # SpecialVocab reads merges, special ids and the template from files
            gguf.SpecialVocab(tdir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)
        for key, t in state.items():
            if key == "lm_head.weight" and c.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ExportError(f"no GGUF name for tensor {key} of a {kind} model")
            _add_tensor(w, gname, t, qtype, _rope_heads(kind, key, c))
    return target


def write_lora_gguf(info: AdapterInfo, base_config, target: Path, qtype: str = "f32") -> Path:
    """The adapter alone as a GGUF LoRA for llama.cpp's ``--lora`` (as convert_lora_to_gguf.py writes
    it: ``<tensor>.lora_a``/``.lora_b`` and ``adapter.lora.alpha``)."""
    import gguf
    from safetensors.torch import load_file

    from shammah.adapters.package import check_adapter_dir

    cfg = check_adapter_dir(info.path)
    note = engines_note(cfg)
    if note:
        raise ExportError(f"{info.name} is {note}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ExportError(f"{info.name}: per-layer ranks have no GGUF LoRA form; export it --merged --gguf")
    kind, arch = _arch(base_config)
    names = gguf.get_tensor_name_map(arch, base_config.num_hidden_layers)
    weights = load_file(str(info.path / "adapter_model.safetensors"))
    check_finite(weights.items())
    with _gguf_writer(target, arch) as w:
        w.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.get("lora_alpha", cfg.get("r", 8))))
        w.add_name(info.name)
        for key in sorted(weights):
            if ".lora_A." not in key:
                continue
            a, b = weights[key], weights[key.replace(".lora_A.", ".lora_B.")]
            hf = key.split("base_model.model.", 1)[-1].replace(".lora_A.weight", ".weight")
            gname = names.get_name(hf, try_suffixes=(".weight",))
            if gname is None:
                raise ExportError(f"no GGUF name for {hf}; llama.cpp cannot apply this adapter")
            # B's rows follow the base's rows: permuted like q/k for Llama; A is untouched
            _add_tensor(w, gname + ".lora_a", a, qtype)
            _add_tensor(w, gname + ".lora_b", b, qtype, _rope_heads(kind, hf, base_config))
    return target


def modelfile(base_gguf: str, adapter_gguf: str | None, chat_template: str | None, sampling: dict) -> str:
    """An Ollama Modelfile: FROM the base (or merged) GGUF, ADAPTER the LoRA GGUF, the chat template
    (ChatML, the format of Qwen and SmolLM2; others keep the template stored in the GGUF) and the
    sampling parameters."""
    lines = [f"FROM {base_gguf}"]
    if adapter_gguf:
        lines.append(f"ADAPTER {adapter_gguf}")
    if chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{CHATML_OLLAMA}"""')
        lines.append('PARAMETER stop "<|im_end|>"')
    for k, v in sampling.items():
        lines.append(f"PARAMETER {k} {v}")
    return "\n".join(lines) + "\n"


__all__ = ["AdapterError", "ExportError", "GGUF_TYPES", "export_adapter", "merged_model", "write_gguf"]


def export(
    info: AdapterInfo,
    base_dir: Path,
    out: Path,
    *,
    merged: bool = False,
    gguf_type: str | None = None,
    ollama: bool = False,
    base_gguf: Path | None = None,
    sampling: dict | None = None,
    say=lambda msg: None,
) -> list[Path]:
    """Everything asked for, under ``out``: ``adapter/`` always (PEFT + model card), ``merged/``,
    ``<name>-<type>.gguf`` (merged) and ``<name>-lora-<type>.gguf``, and a ``Modelfile``.
    ``base_gguf``: the base as a GGUF already (the embedded model), for the Modelfile's FROM."""
    from shammah.adapters.package import check_adapter_dir

    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ExportError(f"--type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    if ollama and gguf_type is None:
        gguf_type = "q8_0"  # Ollama runs GGUF; Q8_0 keeps the greedy text of F16 at half the size
    out = Path(out)
    cfg = check_adapter_dir(info.path)
    note = engines_note(cfg)
    if cfg.get("peft_type") == "PROMPT_TUNING" and (merged or gguf_type):
        raise ExportError(f"{info.name} is {note}; export it without --merged/--gguf/--ollama")
    written = [export_adapter(info, out / "adapter")]
    say(f"wrote {written[-1]} (PEFT; vLLM: --enable-lora --lora-modules {info.name}={written[-1]})")
    if note:
        say(f"note: {info.name} is {note}")
    if rule := Rule.recorded(info.get("rule")):
        say(f"note: shammah writes {info.name}'s style rule ({rule.on_replies()}); the weights do not hold it")
    for said in describe_recorded(info.get("choices")):
        say(f"note: shammah {said} while {info.name} answers; the weights do not hold it")
    if not (merged or gguf_type):
        return written
    model, tok = merged_model(info, base_dir)
    if merged:
        written.append(save_merged(model, tok, out / "merged"))
        say(f"wrote {written[-1]} (transformers: AutoModelForCausalLM.from_pretrained)")
    if gguf_type is None:
        return written
    pre = None
    if base_gguf is not None:
        import gguf

        field = gguf.GGUFReader(base_gguf).get_field("tokenizer.ggml.pre")
        pre = field.contents() if field is not None else None
    merged_file = write_gguf(model, tok, out / f"{info.name}-{gguf_type}.gguf", gguf_type, name=info.name, pre=pre)
    written.append(merged_file)
    say(f"wrote {merged_file} (llama.cpp: llama-cli -m {merged_file.name})")
    lora_file = None
    if note is None:
        lora_type = "f32" if gguf_type == "f32" else "f16"
        lora_file = write_lora_gguf(info, model.config, out / f"{info.name}-lora-{lora_type}.gguf", lora_type)
        written.append(lora_file)
        say(f"wrote {lora_file} (llama.cpp: --lora {lora_file.name} on the base model)")
    if ollama:
        if lora_file is not None and base_gguf is None:  # the base as GGUF too, for FROM + ADAPTER
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(base_dir)
            base_gguf = write_gguf(base, tok, out / f"base-{gguf_type}.gguf", gguf_type, name="base", pre=pre)
            written.append(base_gguf)
        if lora_file is not None:
            text = modelfile(_rel(base_gguf, out), f"./{lora_file.name}", tok.chat_template, sampling or {})
        else:
            text = modelfile(f"./{merged_file.name}", None, tok.chat_template, sampling or {})
        target = out / "Modelfile"
        tmp = _atomic_file(target)
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        written.append(target)
        say(f"wrote {target} (ollama create {info.name} -f {target})")
    return written


def _rel(path: Path, out: Path) -> str:
    path = Path(path).resolve()
    try:
        return "./" + str(path.relative_to(out.resolve()))
    except ValueError:
        return str(path)
