"""The fast decode path for CPUs: packed int4/int8 base weights, a lean decode loop, LoRA unmerged.

Why by hand: decode on a CPU is memory-bound (shared/MEASURED.md: 83% of a step streams the
weights), and transformers' ``generate`` streams them as floats and spends as much again in
per-token Python. Here:

- **Weights**: the linear layers of the transformer blocks in int4 (asymmetric, groups of 32:
  exactly the embedded GGUF's Q4_1 blocks, so for that model this loses nothing), through
  engine/ckernel.py's integer kernel where the CPU has the SIMD for it (x in two int8 passes),
  else torch's ``_weight_int4pack_mm_for_cpu`` (bf16 x); the output head packed the same way,
  but only to pick the REFINE likeliest tokens, whose logits are recomputed in fp32 so near ties
  resolve as the float model would. q/k/v and gate/up are fused into one matmul each.
- **Loop**: the residual stream in fp32, RMSNorm as a LayerNorm (:func:`_twice`), RoPE as one
  complex multiply (q/k rows permuted at load so each rotated pair is adjacent), SDPA against a KV
  cache kept in fp32, and nothing else per token: no logits processors for greedy, no streamer
  object, no stopping criteria.
- **LoRA**: kept unmerged beside the quantized base, fused the same way, so a swap is loading a
  few MB and replacing tensors: the quantized base is never touched or reloaded. Where a C
  compiler is at hand, each fused matmul's LoRA is one call of a small C kernel on bf16 weights
  (engine/ckernel.py: ~1.3 ms a token on the embedded model at r16 where torch's ops took ~3.7);
  else fp32 torch ops (the A matrices of q/k/v stacked; the B matrices in equal-width blocks, one
  batched matmul).

Supported: Llama, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k norms) with static RoPE, and plain
LoRA adapters. Anything else (DoRA, IA3, prompt tuning, sliding windows, dynamic RoPE, a GPU)
answers through transformers, as before: :func:`unsupported` says why.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from shammah.engine.ckernel import SITES

log = logging.getLogger(__name__)

GROUP = 32  # int4 group size (the GGUF Q4_1 block)
REFINE = 64  # logits recomputed in fp32 after the packed head (see FastDecoder.__init__)
RESIDENT = 4  # LoRA adapters kept loaded for per-request switching (a few MB each at r16 on 135M)
ARCHS = ("llama", "qwen2", "qwen3")
_BF16 = torch.bfloat16


# --- kernels ---------------------------------------------------------------------------------
def kernel_available(quant: str) -> bool:
    """Whether this torch build has the packed CPU kernel (tried on a tiny matrix)."""
    try:
        if quant == "int4":
            Int4Linear(torch.randn(32, 64))(torch.randn(1, 64, dtype=_BF16))
        else:
            Int8Linear(torch.randn(32, 64))(torch.randn(1, 64, dtype=_BF16))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` [n, k] as asymmetric int4 in groups of 32: (q int32 [n, k] in 0..15, scale, lo
    [n, k/32]), w ~ q * scale + lo."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scale, lo


class Int4Linear:
    """y = x W^T with W asymmetric int4 in groups of 32: w = (q - 8) * scale + zero, the layout of
    torch's CPU int4 kernel (zero is the value of q = 8), or engine/ckernel.py's where it has
    integer SIMD (then only that copy is kept: on an AVX2 EPYC it is ~3x torch's for decode's
    single row and ~1.25x for a prompt's, with x in two int8 passes finer than torch's bf16)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None, kernel=None):
        q, scale, lo = int4_groups(w)
        self.c = kernel.q4(q, scale, lo, bias) if kernel is not None else None
        if self.c is None:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            self.scales_zeros = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(_BF16)
            self.bias = bias.to(_BF16) if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 ``x`` -> bf16 x W^T (torch's kernel)."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
        return y if self.bias is None else y + self.bias

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 ``x`` -> fp32 x W^T."""
        if self.c is not None:
            return self.c.mm(x)
        return self(x.to(_BF16)).float()

    def add(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out += x W^T (fp32 ``x``), in place."""
        if self.c is not None:
            self.c.add(x, out)
        else:
            out.add_(self(x.to(_BF16)))


class Int8Linear:
    """y = x W^T with W int8 per output channel."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None):
        w = w.float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
        self.weight = torch.round(w / scale[:, None]).to(torch.int8)
        self.scale = scale.to(_BF16)
        self.bias = bias.to(_BF16) if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return self(x.to(_BF16)).float()

    def add(self, out: torch.Tensor, x: torch.Tensor) -> None:
        out.add_(self(x.to(_BF16)))


def _likeliest(logits: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Indices of the REFINE largest logits (unordered): the largest in the blocks with the largest
    maxima, which hold them all. ~4x cheaper than a topk over a 49k vocabulary on a CPU."""
    n = logits.shape[0]
    if n % block or n <= REFINE * block:
        return logits.topk(min(REFINE, n), sorted=False).indices
    blocks = logits.view(-1, block).amax(-1).topk(REFINE, sorted=False).indices
    cand = (blocks[:, None] * block + torch.arange(block)).view(-1)
    return cand[logits[cand].topk(REFINE, sorted=False).indices]


# --- what can run here -----------------------------------------------------------------------
def unsupported(model) -> str | None:
    """Why ``model`` cannot take the fast path (None: it can)."""
    cfg = model.config
    if cfg.model_type not in ARCHS:
        return f"architecture {cfg.model_type!r} (the fast path runs {', '.join(ARCHS)})"
    if next(model.parameters()).device.type != "cpu":
        return "the model runs on a GPU"
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "mlp_bias", False):
        return "sliding-window attention or MLP bias"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear", "llama3", "yarn"):
        return f"RoPE type {rope.get('rope_type')!r} depends on the sequence length"
    dims = [cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * _head_dim(cfg)]
    if any(d % GROUP for d in dims):
        return f"layer widths {dims} are not multiples of {GROUP}"
    return None


def _twice(w: torch.Tensor) -> torch.Tensor:
    """An RMSNorm weight laid out for :meth:`FastDecoder._rms`: RMSNorm(x) is LayerNorm([x, -x])'s
    first half (the mean of [x, -x] is 0 and its variance is mean(x^2)). With the negation and the
    concatenation that is three kernels on a CPU where ``F.rms_norm`` is six (pow, mean, add, rsqrt
    and two muls), 61 times a token on the embedded model: 1.03-1.06x decode (README)."""
    w = w.detach().float()
    return torch.cat([w, w])


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# --- LoRA --------------------------------------------------------------------------------------
FUSED = {  # fused matmul -> the PEFT modules it stands for, in output order
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
_KEY = re.compile(r"layers\.(\d+)\.((?:self_attn|mlp)\.\w+_proj)\.lora_([AB])\.weight$")


class AdapterUnsupported(ValueError):
    pass


def load_lora(
    path: Path,
    n_layers: int,
    out_sizes: dict[str, int],
    rows: dict[str, torch.Tensor] | None = None,
    kernel=None,
) -> list[dict[str, tuple]]:
    """A PEFT LoRA directory -> per layer, per fused matmul: (A^T [in, r_total], B, blocks) in fp32
    with the scaling folded into B and B's rows in the base's output order (``rows``: a module's
    permutation of them). Where every fused part has a LoRA of the same rank, the fused output is
    cut into blocks of equal width (q/k/v under GQA: q is several blocks as wide as k) and B is
    [blocks, r, width], one batched matmul that reads no zeros; ``blocks`` then says which part's
    r columns of x A each block takes (None: one block per part). Otherwise B is block-diagonal
    [r_total, out]. With ``kernel`` (engine/ckernel.py) every fused matmul with a LoRA is a
    :class:`ckernel.Site` instead (bf16, one C call a token; missing parts and lower ranks padded
    with zeros). Raises
    AdapterUnsupported for what only transformers can run."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("alpha_pattern"):
        raise AdapterUnsupported("only plain LoRA adapters run on the fast path")
    if cfg.get("modules_to_save") or cfg.get("lora_bias"):
        raise AdapterUnsupported("adapters with saved modules or LoRA biases run through transformers")
    alpha = float(cfg.get("lora_alpha", 8))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterUnsupported(f"adapter weight {key} is outside the attention/MLP projections")
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    # a module whose B is zero changes nothing (a fresh LoRA; the learning loop's rule-only adapter):
    # it costs no matmuls, and an adapter of only such modules decodes at the base's speed
    found = {k: p for k, p in found.items() if "B" not in p or bool(p["B"].any())}

    def scaled(module: str, p: dict) -> torch.Tensor:  # B [out, r] with the LoRA scaling in it
        r = p["A"].shape[0]
        b = p["B"].float() * (alpha / (r**0.5 if cfg.get("use_rslora") else r))
        perm = (rows or {}).get(module)
        return b if perm is None else b[perm]

    layers: list[dict[str, tuple]] = [{} for _ in range(n_layers)]
    for i in range(n_layers):
        for fused, modules in FUSED.items():
            parts = [(j, found[(i, mod)]) for j, mod in enumerate(modules) if (i, mod) in found]
            if not parts:
                continue
            sizes = [out_sizes[mod] for mod in modules]
            ranks = {p["A"].shape[0] for _, p in parts}

            if kernel is not None:
                # A part without a LoRA (PEFT's q/v-only targets; a module whose B is zero) or of a
                # lower rank is padded with zeros: the same sum, and the site stays one C call
                # (as a torch-ops site it would also keep the whole token out of the C step)
                r, width = max(ranks), parts[0][1]["A"].shape[1]
                have = dict(parts)
                a_s, b_s = [], []
                for j, mod in enumerate(modules):
                    a, b = torch.zeros(r, width), torch.zeros(sizes[j], r)
                    if j in have:
                        rj = have[j]["A"].shape[0]
                        a[:rj], b[:, :rj] = have[j]["A"].float(), scaled(mod, have[j])
                    a_s.append(a)
                    b_s.append(b)
                layers[i][fused] = kernel.site(a_s, b_s)
                continue
            a = torch.cat([p["A"].float() for _, p in parts])
            blocks = None
            if len(parts) > 1 and len(parts) == len(modules) and len(ranks) == 1:
                # A block-diagonal B is mostly zeros (gate/up: half of it, q/k/v: two thirds), and
                # decode is memory-bound: on the embedded model the blocks save ~0.3 ms a token.
                w = math.gcd(*sizes)
                b = (
                    torch.cat([scaled(modules[j], p).view(sizes[j] // w, w, -1) for j, p in parts])
                    .transpose(1, 2)
                    .contiguous()
                )
                if b.shape[0] > len(parts):
                    blocks = torch.cat([torch.full((sizes[j] // w,), j) for j in range(len(parts))])
            else:
                offsets = [sum(sizes[:j]) for j in range(len(sizes))]
                b = torch.zeros(sum(sizes), a.shape[0])
                col = 0
                for j, p in parts:
                    r = p["A"].shape[0]
                    b[offsets[j] : offsets[j] + sizes[j], col : col + r] = scaled(modules[j], p)
                    col += r
                b = b.t().contiguous()
            # fp32 and pre-transposed: small bf16 matmuls are ~3x slower on CPUs than fp32 ones
            layers[i][fused] = (a.t().contiguous(), b, blocks)
    return layers


# --- the model -----------------------------------------------------------------------------------
@dataclass
class _Layer:
    norm1: torch.Tensor
    norm2: torch.Tensor
    qkv: Int4Linear | Int8Linear
    o: Int4Linear | Int8Linear
    gate_up: Int4Linear | Int8Linear
    down: Int4Linear | Int8Linear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def resident_key(name: str | None, path: Path) -> tuple:
    """What a decoder keeps a loaded adapter under: an adapter rewritten on disk is a new one."""
    f = Path(path) / "adapter_model.safetensors"
    return (name, str(path), f.stat().st_mtime_ns if f.exists() else 0)


class FastDecoder:
    """A transformers Llama/Qwen2/Qwen3 model, re-laid for decoding on a CPU (see the module doc)."""

    def __init__(self, model, quant: str = "int4", kernel=None, kernel_why: str = "", c_int4: bool | None = None):
        """``kernel``: engine/ckernel.py's Kernel for the LoRA (None: torch ops, because
        ``kernel_why``) and, unless ``c_int4`` is False, where it has integer SIMD: its int4
        matmuls (prompts and decode) and decode's whole step (ckernel.Step), one C call a token.
        torch's int4 kernel takes bf16 activations: without native bf16 (an AVX2 EPYC) it was 64%
        of a step and ~87% of a prompt, and the C one is ~3x and ~1.25x faster there; the step took
        the ~30 small torch ops a layer around the matmuls from 5.3 ms to ~0.3 ms of a token. On
        CPUs with native bf16 torch's int4 kernel may be the faster matmul, but not by that much
        (not measured there: no such CPU in the sessions since)."""
        cfg = model.config
        self.quant = quant
        self.kernel = kernel
        if kernel is not None:
            lora = "LoRA unmerged (bf16, C kernel)"
        else:
            lora = "LoRA unmerged (fp32, torch ops" + (f": {kernel_why}" if kernel_why else "") + ")"
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, _head_dim(cfg)
        self.eps = cfg.rms_norm_eps
        if quant == "int4":
            c = kernel if c_int4 is not False and kernel is not None and kernel.has_q4 else None
            self.c_base = c is not None

            def lin(w, bias=None):
                return Int4Linear(w, bias, c)
        else:
            lin, self.c_base = Int8Linear, False
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        qd, kd = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.out_sizes = {
            "self_attn.q_proj": qd,
            "self_attn.k_proj": kd,
            "self_attn.v_proj": kd,
            "self_attn.o_proj": cfg.hidden_size,
            "mlp.gate_proj": cfg.intermediate_size,
            "mlp.up_proj": cfg.intermediate_size,
            "mlp.down_proj": cfg.hidden_size,
        }

        # RoPE rotates dimension i of a head with dimension i + head_dim/2. The rows of q and k
        # are permuted so that these pairs sit side by side, and RoPE is one complex multiply per
        # token instead of a rotate-half and three more ops per layer. Scores q.k are the same
        # under one permutation of both; v and the KV cache of k need nothing else.
        half = self.head_dim // 2
        pair = torch.stack([torch.arange(half), torch.arange(half, self.head_dim)], -1).reshape(-1)
        self.rows = {
            "self_attn.q_proj": (torch.arange(self.n_heads)[:, None] * self.head_dim + pair).reshape(-1),
            "self_attn.k_proj": (torch.arange(self.n_kv)[:, None] * self.head_dim + pair).reshape(-1),
        }

        def cat(p: str, names: tuple[str, ...], kind: str) -> torch.Tensor | None:
            ts = [sd.get(f"{p}{n}.{kind}") for n in names]
            if ts[0] is None:
                return None
            return torch.cat([t[self.rows[n]] if n in self.rows else t for n, t in zip(names, ts, strict=True)])

        def head_norm(key: str) -> torch.Tensor | None:  # Qwen3's per-head q/k norm, in pair order
            return sd[key].float()[pair] if key in sd else None

        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                _Layer(
                    norm1=_twice(sd[p + "input_layernorm.weight"]),
                    norm2=_twice(sd[p + "post_attention_layernorm.weight"]),
                    qkv=lin(cat(p, FUSED["qkv"], "weight"), cat(p, FUSED["qkv"], "bias")),
                    o=lin(sd[p + "self_attn.o_proj.weight"], sd.get(p + "self_attn.o_proj.bias")),
                    gate_up=lin(cat(p, FUSED["gate_up"], "weight")),
                    down=lin(sd[p + "mlp.down_proj.weight"]),
                    q_norm=head_norm(p + "self_attn.q_norm.weight"),
                    k_norm=head_norm(p + "self_attn.k_norm.weight"),
                )
            )
        self.embed = sd["model.embed_tokens.weight"].to(_BF16)
        head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        # The head only picks the REFINE candidates whose logits are then computed in fp32, so it
        # can be as coarse as the blocks: int4 reads ~60% of int8's bytes per token (28 -> 18 MB on
        # the embedded model, ~1.5 ms of a ~14 ms token). Measured there over 134 positions of
        # text: the fp32 argmax is always within the int4 head's top 4 and each fp32 top-5 token
        # within its top 54, so with 64 refined the perplexity of a fixed text is 10.46 against
        # the float model's 10.55 (the int8 head with 32 refined: 10.43).
        self.head = lin(head)
        self.head_rows = self.embed if head is sd["model.embed_tokens.weight"] else head.to(_BF16)
        self.final_norm = _twice(sd["model.norm.weight"])
        if self.c_base and any(getattr(ly, s).c is None for ly in self.layers for s in SITES):
            self.c_base = False  # a matmul without a C copy (rows not in blocks of 8): no C step
        rot = model.model.rotary_emb
        self.inv_freq = rot.inv_freq.detach().float()
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self.lora: list[dict[str, tuple]] | None = None
        self.lora_name: str | None = None
        self._resident: dict[tuple, list] = {}  # (name, path, mtime) -> loaded LoRA, oldest first
        self._rope = torch.empty(0, dtype=torch.complex64)
        self.refined = torch.empty(0, dtype=torch.long)  # the logits the last forward computed in fp32
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self.lock = threading.Lock()
        # decode's whole step in one C call where its int4 matmuls are in C (ckernel.Step): built
        # in _cstep (which the KV cache keeps up to date), used while it is also self.step
        self._cstep = None
        if self.c_base:
            plain = [  # the RMSNorm weights: the first half of _twice's
                {f: getattr(ly, f) for f in ("q_norm", "k_norm")}
                | {"norm1": ly.norm1[: cfg.hidden_size], "norm2": ly.norm2[: cfg.hidden_size]}
                | {site: getattr(ly, site).c for site in SITES}
                for ly in self.layers
            ]
            dims = {"hidden": cfg.hidden_size, "inter": cfg.intermediate_size, "n_heads": self.n_heads,
                    "n_kv": self.n_kv, "hd": self.head_dim}  # fmt: skip
            self._cstep = kernel.step(plain, dims, self.eps)
        self.step = self._cstep
        self._step_lora = True  # the active LoRA runs in the C step
        if self.step is not None and (bad := self._check_step()) is not None:
            log.warning("%s: decode runs its steps in torch ops", bad)
            self.step = None
        if self.step is not None:
            base = f"{quant} weights (C kernel, activations in two int8 passes; decode in C, one call a token)"
        else:
            base = f"{quant} weights" + (" (C kernel, activations in two int8 passes)" if self.c_base else "")
        self.label = f"{base}, {lora}"  # what /status says of this path

    def _check_step(self) -> str | None:
        """The C step against this decoder's torch ops on its first positions (a few tokens'
        time): a miscompiled or wrong step is not used. None: it agrees.

        Compared: the KV cache of the first two layers (on a model whose attention barely depends
        on position, random weights, a wrong RoPE hardly shows in the logits, but it does in the
        keys) and, loosely, the logits. Deeper than that the two may drift apart by design: with
        int8 activations a value rounded the other way is a step of its group's largest / 127 (or
        / 32258 in the second pass), and the embedded model's residual stream reaches ~300 by
        layer 2, so a 1e-5 difference in a norm (torch's LayerNorm form of RMSNorm,
        :func:`_twice`) can grow over 30 layers on either path (perplexity within 2% of the float
        model on both)."""
        ids = [1, 2, 3, 4]
        n, deep = len(ids), min(2, len(self.layers))

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode():
                logits = torch.stack([self.forward(torch.tensor([t]), i).clone() for i, t in enumerate(ids)])
            kv = [torch.cat([k[:, :n], v[:, :n]]) for k, v in zip(self._k[:deep], self._v[:deep], strict=True)]
            return logits, torch.stack(kv)

        step, self.step = self.step, None
        want, want_kv = run()
        self.step = step
        got, got_kv = run()
        cos = F.cosine_similarity(got, want, dim=-1).min().item()
        kv = ((got_kv - want_kv).norm() / want_kv.norm()).item()
        if cos > 0.98 and kv < 2e-2:  # correct on the embedded model: 0.9947 and 0.13%
            return None
        return f"the C decode step disagrees with torch ops (logits cosine {cos:.4f}, KV cache off by {kv:.2%})"

    # adapters ----------------------------------------------------------------------------
    def set_lora(self, name: str | None, path: Path | None) -> None:
        """Answer with LoRA ``name`` from ``path`` (None: the base alone). Raises AdapterUnsupported.
        The last RESIDENT adapters stay in memory (a server alternating between adapters per
        request swaps a pointer); an adapter rewritten on disk is read again."""
        layers = None
        if path is not None:
            key = resident_key(name, path)
            layers = self._resident.pop(key, None)
            if layers is None:
                layers = load_lora(path, len(self.layers), self.out_sizes, self.rows, self.kernel)
            self._resident[key] = layers
            while len(self._resident) > RESIDENT:
                self._resident.pop(next(iter(self._resident)))
        with self.lock:  # never between two tokens of a reply
            self.lora, self.lora_name = layers, name
            if self._cstep is not None:
                self._step_lora = self._cstep.set_lora(layers)

    # caches ------------------------------------------------------------------------------
    def _room(self, n: int) -> None:
        """KV cache and RoPE tables for ``n`` positions, grown in steps of 256."""
        have = self._k[0].shape[1] if self._k else 0
        if n <= have:
            return
        cap = -(-n // 256) * 256
        for i in range(len(self.layers)):
            k = torch.zeros(self.n_kv, cap, self.head_dim)
            v = torch.zeros(self.n_kv, cap, self.head_dim)
            if have:
                k[:, :have], v[:, :have] = self._k[i][:, :have], self._v[i][:, :have]
            if i < len(self._k):
                self._k[i], self._v[i] = k, v
            else:
                self._k.append(k)
                self._v.append(v)
        freqs = torch.outer(torch.arange(cap, dtype=torch.float32), self.inv_freq)
        self._rope = torch.polar(torch.full_like(freqs, self.rope_scale), freqs)
        if self._cstep is not None:
            self._cstep.cache(self._k, self._v, torch.empty(self.n_heads, cap))

    # one forward ---------------------------------------------------------------------------
    # The residual stream and everything between the packed matmuls run in fp32 (the kernels take
    # bf16 in and give bf16 out): fewer conversions per token than a bf16 stream, and closer to
    # the float model. LoRA is fp32 too: small bf16 matmuls are ~3-5x slower on CPUs than fp32 ones.
    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _rms(self, x: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """RMSNorm of ``x`` with weight ``w2`` = [w, w] (see :func:`_twice`)."""
        n = x.shape[-1]
        return F.layer_norm(torch.cat([x, x.neg()], -1), (2 * n,), w2, None, self.eps)[..., :n]

    @staticmethod
    def _mm(lin, lora: dict, name: str, x: torch.Tensor) -> torch.Tensor:
        """fp32 ``x`` through a packed matmul plus the LoRA's ``name`` part, fp32 out."""
        y = lin.mm(x)
        ab = lora.get(name)
        if ab is None:
            return y
        if type(ab) is not tuple:  # a ckernel.Site
            ab.add(x, y)
            return y
        a, b, blocks = ab
        if b.dim() == 2:
            return y.addmm_(x @ a, b)
        n, r, w = b.shape  # blocks of equal width: [t, n*w] is [n, t, w] after a transpose
        t = x.shape[0]
        z = (x @ a).view(t, -1, r)
        if blocks is not None:
            z = z.index_select(1, blocks)  # ~half the cost of z[:, blocks]
        y.view(t, n, w).transpose(0, 1).baddbmm_(z.transpose(0, 1), b)
        return y

    @staticmethod
    def _add_mm(out: torch.Tensor, lin, lora: dict, name: str, x: torch.Tensor) -> None:
        """out += (fp32 ``x`` through a packed matmul plus the LoRA's ``name`` part), in place: the
        residual stream takes the bf16 product as it is (two ops fewer per layer than a sum)."""
        lin.add(out, x)
        ab = lora.get(name)
        if ab is None:
            return
        if type(ab) is tuple:
            out.addmm_(x @ ab[0], ab[1])  # o and down: one part, B [r, out]
        else:
            ab.add(x, out)

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (fp32) of the last position after feeding ``ids`` at positions start...; the
        KV cache before ``start`` must hold this sequence's earlier positions."""
        t = ids.shape[0]
        end = start + t
        self._room(end)
        x = self.embed[ids].float()  # a copy: the residual stream is updated in place
        if t == 1 and self.step is not None and self._step_lora:
            self.step.run(x, start, self._rope.data_ptr() + start * self._rope.stride(0) * 8)
            return self._head(x)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        qd, kd = nh * hd, nkv * hd
        rope = self._rope[start:end, None, :]
        for i, ly in enumerate(self.layers):
            lora = self.lora[i] if self.lora is not None else {}
            qkv = self._mm(ly.qkv, lora, "qkv", self._rms(x, ly.norm1))
            qk = qkv[:, : qd + kd].view(t, nh + nkv, hd)
            if ly.q_norm is not None:  # Qwen3: RMSNorm per head on q and k, before RoPE
                qk = torch.cat([self._norm(qk[:, :nh], ly.q_norm), self._norm(qk[:, nh:], ly.k_norm)], 1)
            qk = torch.view_as_real(torch.view_as_complex(qk.reshape(t, nh + nkv, hd // 2, 2)) * rope).view(
                t, nh + nkv, hd
            )
            self._k[i][:, start:end] = qk[:, nh:].transpose(0, 1)
            self._v[i][:, start:end] = qkv[:, qd + kd :].view(t, nkv, hd).transpose(0, 1)
            a = F.scaled_dot_product_attention(
                qk[:, :nh].transpose(0, 1)[None],
                self._k[i][None, :, :end],
                self._v[i][None, :, :end],
                is_causal=start == 0 and t > 1,
                enable_gqa=True,
            )
            a = a[0].transpose(0, 1).reshape(t, qd)
            self._add_mm(x, ly.o, lora, "o", a)
            g_, u = self._mm(ly.gate_up, lora, "gate_up", self._rms(x, ly.norm2)).chunk(2, -1)
            self._add_mm(x, ly.down, lora, "down", F.silu(g_) * u)
        return self._head(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The logits (fp32) after the last position of the residual stream ``x``."""
        xf = self._rms(x[-1:], self.final_norm)
        logits = self.head.mm(xf)[0]
        # bf16 logits resolve ~0.1 around 25 (and the packed head is coarser still): recompute the
        # likeliest in fp32 so the token picked, and near ties, go the way the float model goes.
        top = _likeliest(logits)
        logits[top] = self.head_rows[top].float() @ xf[0]
        self.refined = top
        return logits

    # decoding --------------------------------------------------------------------------------
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        eos: int | set[int],
        sample=None,
        stop: threading.Event | None = None,
    ) -> Iterator[int]:
        """Token ids, one at a time, ending after EOS (yielded), ``max_new_tokens`` or ``stop``.
        ``sample(ids_so_far, logits) -> id``; None = greedy."""
        eos = {eos} if isinstance(eos, int) else set(eos)
        with self.lock, torch.inference_mode():
            ids = list(prompt)
            logits = self.forward(torch.tensor(ids), 0)
            for _ in range(max_new_tokens):
                if stop is not None and stop.is_set():
                    return
                # greedy: the best of the refined candidates (a full argmax costs ~40 us on a CPU)
                nxt = int(self.refined[logits[self.refined].argmax()]) if sample is None else sample(ids, logits)
                ids.append(nxt)
                yield nxt
                if nxt in eos:
                    return
                logits = self.forward(torch.tensor([nxt]), len(ids) - 1)

    def tokens(self, prompt: list[int], params, eos: int | set[int], stop: threading.Event | None = None):
        """:meth:`generate` with ``params``' sampling (the surface the llama.cpp backend shares)."""
        sample = sampler(params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.seed)
        return self.generate(prompt, params.max_new_tokens, eos, sample, stop)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits at every position of ``ids`` (fp32 [T, V]), for quality checks (perplexity)."""
        with self.lock, torch.inference_mode():
            return torch.stack([self.forward(torch.tensor([tok]), i) for i, tok in enumerate(ids)])


def sampler(temperature: float, top_p: float, top_k: int, repetition_penalty: float, seed: int):
    """A ``sample`` for :meth:`FastDecoder.generate` from transformers' own logits processors
    (the same semantics as ``generate``); None for greedy without a repetition penalty."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature <= 0:
        if not procs:
            return None

        def greedy(ids: list[int], logits: torch.Tensor) -> int:
            return int(procs(torch.tensor([ids]), logits[None])[0].argmax())

        return greedy
    procs.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    gen = torch.Generator()
    gen.manual_seed(seed if seed >= 0 else int(time.time_ns() % 2**63))

    def draw(ids: list[int], logits: torch.Tensor) -> int:
        scores = procs(torch.tensor([ids]), logits[None])[0]
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))

    return draw
