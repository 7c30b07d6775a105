"""Decode speed as a user sees it, beside llama.cpp on the same GGUF, in one run.

    .venv/bin/python bench/decode.py [--tokens 128] [--reps 3] [--install-llama-cpp] [--qwen | --qwen-only]

For each setup: time to first token and decode tokens/s after it (wall time of the stream, the
way the chat prints it), median of ``--reps``, with a random LoRA r=16 on all linear layers
active (what a user who taught it runs) and without:

- shammah's fast path (engine/fast.py: packed int4, LoRA unmerged), its llama.cpp backend
  (engine/llamacpp.py: the GGUF with the LoRA as a GGUF LoRA; where llama-cpp-python is installed
  in shammah's environment, ``pip install -e '.[llama]'``) and transformers' generate
  (``model.fast_decode = off``), all through ``Engine.stream``;
- llama.cpp (llama-cpp-python) on the embedded GGUF itself, same thread count, greedy. It lives in
  its own cached environment (``~/.cache/shammah-bench/llama-venv``), never in shammah's: building
  it from source takes ~10 min on 2 cores, so it is built only with ``--install-llama-cpp``.

Then quality (fast path vs the float model): perplexity on a fixed text, and how many greedy
tokens match the fp32 transformers reference on 5 prompts; and hot-swap latency on the fast path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "shammah-bench"
TORCH_OPS = "fast path without C kernels"
LLAMA_VENV = CACHE / "llama-venv"
PROMPT = "Write a short story about a lighthouse keeper."
PROMPTS = [
    PROMPT,
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "List three fruits.",
    "How do I sort a list in Python?",
]
TEXT = (
    "The water cycle describes how water moves on Earth. Water evaporates from oceans and lakes, "
    "rises as vapour, cools and condenses into clouds, and falls again as rain or snow. Rivers carry "
    "it back to the sea, and plants return some of it to the air through their leaves."
)

LLAMA_SNIPPET = r"""
import json, sys, time
from llama_cpp import Llama
gguf, ids, n, reps, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
out = []
for _ in range(reps + 1):
    llm.reset()
    t0 = time.perf_counter(); first = None; k = 0
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        k += 1
        if first is None: first = time.perf_counter()
        if tok == llm.token_eos() or k >= n: break
    out.append((first - t0, (k - 1) / (time.perf_counter() - first), k))
print(json.dumps(out[1:]))
"""


LLAMA_PIN = "llama-cpp-python==0.3.36"


def no_amx_flags() -> str:
    """CMake flags for llama.cpp: this CPU's instruction sets (from /proc/cpuinfo) without AMX.
    A native build uses every instruction the CPU lists, and some VMs list AMX but trap on its tile
    instructions (measured: SIGILL in libggml-cpu on the first prompt of more than a few tokens).
    GGML_AMX_* alone is ignored while GGML_NATIVE is on, hence the explicit list."""
    cpu = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    isa = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI2": "bmi2", "AVX512": "avx512f"}
    isa.update(AVX512_VBMI="avx512vbmi", AVX512_VNNI="avx512_vnni", AVX512_BF16="avx512_bf16")
    on = " ".join(f"-DGGML_{k}={'ON' if v in cpu else 'OFF'}" for k, v in isa.items())
    return f"-DGGML_NATIVE=OFF {on} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"


def install_llama_cpp() -> None:
    from shammah.engine.llamacpp import PROBE
    from shammah.engine.resolve import embedded_gguf

    pip = [str(LLAMA_VENV / "bin" / "pip"), "install", "-q"]
    if not (LLAMA_VENV / "bin" / "python").exists():
        print("building", LLAMA_PIN, "into", LLAMA_VENV, "(~10 min on 2 cores)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
        subprocess.run([*pip, f"{LLAMA_PIN.replace('==', '[server]==')}"], check=True)
    smoke = [str(LLAMA_VENV / "bin" / "python"), "-c", PROBE, str(embedded_gguf())]  # the backend's own test
    if subprocess.run(smoke, capture_output=True).returncode != 0:
        print("the native build fails on this CPU (AMX listed but trapping?): rebuilding without AMX", flush=True)
        env = {**os.environ, "CMAKE_ARGS": no_amx_flags()}
        subprocess.run([*pip, "--force-reinstall", "--no-deps", "--no-cache-dir", LLAMA_PIN], check=True, env=env)
        subprocess.run(smoke, check=True, capture_output=True)


def llama_cpp(gguf: Path, ids: list[int], tokens: int, reps: int, threads: int) -> list | None:
    py = LLAMA_VENV / "bin" / "python"
    if not py.exists():
        return None
    r = subprocess.run(
        [str(py), "-c", LLAMA_SNIPPET, str(gguf), json.dumps(ids), str(tokens), str(reps), str(threads)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        why = r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        print(f"  llama.cpp failed ({why[0]}): run with --install-llama-cpp to test and rebuild it")
        return None
    return json.loads(r.stdout)


def stream_once(eng, msgs, params) -> tuple[float, float, int]:
    llm = getattr(eng._fast, "llm", None)
    if llm is not None:  # the same prompt again would reuse llama.cpp's KV cache: time a cold prompt
        llm.reset()
    t0 = time.perf_counter()
    first = None
    n = 0
    for c in eng.stream(msgs, params):
        if first is None and c.text:
            first = time.perf_counter()
        if c.finish_reason:
            n = c.new_tokens
    return first - t0, (n - 1) / (time.perf_counter() - first), n


def random_lora(model_path: str, out: Path, rank: int = 16) -> Path:
    """A LoRA on every linear layer with random (non-zero) B, so it really costs what one costs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    m = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.002)
    m.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--install-llama-cpp", action="store_true", help="build the llama.cpp baseline first")
    ap.add_argument("--qwen", action="store_true", help="also random-weight models of real Qwen sizes")
    ap.add_argument("--qwen-only", action="store_true", help="only the real Qwen sizes")
    args = ap.parse_args()
    if args.install_llama_cpp:
        install_llama_cpp()
    if not args.qwen_only:
        run(args.tokens, args.reps)
    if args.qwen or args.qwen_only:
        qwen_sizes(args.tokens, args.reps)


def run(tokens: int = 128, reps: int = 3) -> None:
    import torch

    from shammah.config import ModelConfig
    from shammah.engine import Engine, ckernel
    from shammah.engine.fast import FastDecoder
    from shammah.engine.resolve import embedded_gguf

    threads = torch.get_num_threads()
    msgs = [{"role": "user", "content": PROMPT}]
    from shammah.engine import llamacpp as backend

    engines = {}
    modes = {"shammah fast path": "int4", "transformers generate": "off"}
    if backend.available():
        modes = {"shammah llama.cpp backend": "llamacpp", **modes}
    for label, mode in modes.items():
        cfg = ModelConfig(base="embedded", temperature=0.0, max_new_tokens=tokens, fast_decode=mode)
        engines[label] = Engine(cfg, CACHE).load()
    # the baseline for the C kernels (engine/ckernel.py: the LoRA, and int4 without native bf16): torch ops
    os.environ["SHAMMAH_LORA_KERNEL"] = "off"
    cfg = ModelConfig(base="embedded", temperature=0.0, max_new_tokens=tokens, fast_decode="int4")
    engines[TORCH_OPS] = Engine(cfg, CACHE).load()
    del os.environ["SHAMMAH_LORA_KERNEL"]
    fast = engines["shammah fast path"]
    print(f"fast path: {fast.info()['decode']}; baseline: {engines[TORCH_OPS].info()['decode']}")
    params = fast.gen_params(repetition_penalty=1.0)
    tmp = Path(tempfile.mkdtemp())
    lora = random_lora(fast.loaded.path, tmp / "lora")
    lora2 = random_lora(fast.loaded.path, tmp / "lora2")

    # Round-robin: each round runs llama.cpp once and every setup once, so a machine that slows
    # down for a while (a shared host) slows the baseline and the setups alike.
    setups = [(label, with_lora) for label in engines for with_lora in (False, True) if with_lora or label != TORCH_OPS]

    def run_setup(label: str, with_lora: bool):
        eng = engines[label]
        eng.activate("bench" if with_lora else None, lora if with_lora else None)  # resident: not timed
        return stream_once(eng, msgs, params)

    for setup in setups:
        run_setup(*setup)  # warm-up
    ids = fast.encode(msgs)
    runs: dict = {setup: [] for setup in setups}
    llama: list | None = []
    for _ in range(reps):
        got = llama_cpp(embedded_gguf(), ids, tokens, 1, threads)
        llama = llama + got if (llama is not None and got) else None
        for setup in setups:
            runs[setup].append(run_setup(*setup))
    rows = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}

    print(
        f"decode, embedded SmolLM2-135M, {tokens} new tokens, greedy, {threads} threads, median of {reps} rounds (each round: llama.cpp, then every setup)"
    )
    base = None
    if llama:
        base = (statistics.median(r[0] for r in llama), statistics.median(r[1] for r in llama))
        print(
            f"  {'llama.cpp (same GGUF)':32} first token {base[0] * 1000:5.0f} ms   {base[1]:6.1f} tok/s   (baseline)"
        )
    else:
        print("  llama.cpp baseline not installed: run with --install-llama-cpp (builds it once, ~10 min)")
    for (label, with_lora), (ttft, rate) in rows.items():
        name = f"{label}{' + LoRA r16' if with_lora else ''}"
        ratio = f"   {rate / base[1]:.2f}x llama.cpp, first token {ttft / base[0]:.2f}x" if base else ""
        print(f"  {name:32} first token {ttft * 1000:5.0f} ms   {rate:6.1f} tok/s{ratio}")
    f, h = rows[("shammah fast path", True)][1], rows[("transformers generate", True)][1]
    print(f"  fast path vs transformers, LoRA active: {f / h:.1f}x")
    t = rows[(TORCH_OPS, True)][1]
    print(f"  fast path with the C kernels vs without, LoRA active: {f / t:.2f}x")
    for label in ("shammah fast path", TORCH_OPS):
        engines[label].activate("bench", lora)
    a, b = (fast.tokenizer(engines[k].reply(msgs, params))["input_ids"] for k in ("shammah fast path", TORCH_OPS))
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    print(f"  greedy tokens identical with and without the C kernels, LoRA active: {same} of {len(b)}")

    if "shammah llama.cpp backend" in rows:
        lc = rows[("shammah llama.cpp backend", True)][1]
        print(f"  llama.cpp backend vs transformers, LoRA active: {lc / h:.1f}x")

    # hot-swap: two different LoRAs of the same shape (each new one is loaded, not a cached pointer)
    for label, eng in engines.items():
        if label in ("transformers generate", TORCH_OPS):
            continue
        swaps = []
        for i in range(6):
            d = tmp / f"swap{i}"
            if not d.exists():
                import shutil

                shutil.copytree(lora if i % 2 else lora2, d)
            swaps.append(eng.activate(f"s{i}", d))
        print(
            f"hot-swap, {label}: median {statistics.median(swaps) * 1000:.0f} ms, first {swaps[0] * 1000:.0f} ms "
            "(goal < 100 ms; a new adapter, converted on first use)"
        )

    form_scope_cost(fast, lora, params, reps, tmp)

    # quality against the float model
    from transformers import AutoModelForCausalLM

    fast.activate(None)
    ref = AutoModelForCausalLM.from_pretrained(fast.loaded.path, dtype=torch.float32).eval()
    dec = FastDecoder(ref, "int4", *ckernel.load(CACHE))  # as the engine builds it
    tok = fast.tokenizer
    text_ids = tok(TEXT)["input_ids"]
    target = torch.tensor(text_ids[1:])
    with torch.inference_mode():
        ref_logits = ref(torch.tensor([text_ids])).logits[0, :-1]

    def ppl(logits) -> float:
        return math.exp(torch.nn.functional.cross_entropy(logits.float(), target).item())

    p_ref, p_fast = ppl(ref_logits), ppl(dec.logits(text_ids)[:-1])
    print(f"quality: perplexity on a fixed text {p_fast:.3f} vs {p_ref:.3f} fp32 ({(p_fast / p_ref - 1) * 100:+.2f}%)")
    same = []
    for p in PROMPTS:
        pids = fast.encode([{"role": "user", "content": p}])
        with torch.inference_mode():
            r = ref.generate(torch.tensor([pids]), max_new_tokens=32, do_sample=False)[0, len(pids) :].tolist()
        g = list(dec.generate(pids, 32, tok.eos_token_id))
        same.append(next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), min(len(r), len(g))))
    print(f"  greedy tokens identical to fp32 transformers, of 32, on 5 prompts: {same}")
    if backend.available():  # llama.cpp's own logits on the embedded GGUF (Q4_1), the backend's weights
        from llama_cpp import Llama

        llm = Llama(model_path=str(embedded_gguf()), n_ctx=512, logits_all=True, verbose=False)
        llm.eval(text_ids)
        p_llama = ppl(torch.tensor(llm.scores[: len(text_ids) - 1]))
        print(
            f"  llama.cpp backend (Q4_1 GGUF): perplexity {p_llama:.3f} ({(p_llama / p_ref - 1) * 100:+.2f}% vs fp32)"
        )


# The real configs (config.json on the Hub) of the models shammah is designed to serve. Speed does not
# depend on weight values, so random weights of the same shapes measure what the real models cost.
QWEN = {
    "Qwen2.5-0.5B-Instruct": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
    "Qwen3-0.6B": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
}  # fmt: skip


def form_scope_cost(eng, lora: Path, params, reps: int, tmp: Path) -> None:
    """What routing by a form scope (adapters/scope.py) adds to the first token: the same LoRA
    scoped by subject (a word test) and by a form (a key: a partial prefill of the base model, for a
    question it has not seen yet), each answering a question inside its scope."""
    import shutil

    from shammah.adapters.scope import SCOPE_FILE, Scope, learn
    from shammah.engine.keys import default_layer
    from shammah.training import online

    layer = default_layer(eng.loaded.model)
    keys = online.key_of(eng.loaded.model, eng.tokenizer, layer)
    taught = ["Name three fruits.", "List three colors.", "Name three animals.", "List three vegetables."]
    taught += ["Name three countries.", "List three musical instruments."]  # bench/lessons.py's jsonlist
    asked = ["Name three birds.", "List three sports.", "Name three flowers.", "List three metals."]
    asked += ["Name three planets.", "List three drinks."]
    form = learn(taught, lambda w: False, keys, online.ANCHOR_PROMPTS, layer)
    rows = {}
    for label, scope, suffix in (
        ("no scope", Scope(), ""),
        ("subject scope", Scope(frozenset({"quenland"})), " (Quenland)"),
        ("form scope", form, ""),
    ):
        d = tmp / f"scoped-{label.replace(' ', '-')}"
        shutil.copytree(lora, d)
        (d / "shammah.json").write_text(json.dumps({"scope": scope.summary()}))
        if scope.form is not None:
            (d / SCOPE_FILE).write_text(json.dumps(scope.to_json()))
        eng.activate(label, d)
        chats = [[{"role": "user", "content": q.rstrip(".") + suffix + "."}] for q in asked[: reps + 1]]
        assert all(eng.covers(c) for c in chats), label
        # a new question each time: a key is memoised per question, and a user asks new ones
        runs = [stream_once(eng, c, params) for c in chats][1:]
        rows[label] = statistics.median(r[0] for r in runs)
    print("first token with the LoRA active, a question inside its scope (fast path):")
    for label, ttft in rows.items():
        print(f"  {label:14} {ttft * 1000:5.0f} ms   {ttft / rows['no scope']:.2f}x no scope")
    eng.activate(None)


def timed(gen, n: int) -> tuple[float, float]:
    """(seconds to the first token, tokens/s after it) of a token iterator, as the chat shows them."""
    t0 = time.perf_counter()
    first, k = None, 0
    for _ in gen:
        k += 1
        if first is None:
            first = time.perf_counter()
        if k >= n:
            break
    return first - t0, (k - 1) / (time.perf_counter() - first)


def median_runs(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    runs = [fn() for _ in range(reps)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def qwen_sizes(tokens: int, reps: int) -> None:
    """Decode (fast path, transformers, llama.cpp on a GGUF of the same model; with a LoRA r16) and a
    LoRA training step at real sizes."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from shammah.adapters.export import write_gguf
    from shammah.engine import ckernel
    from shammah.engine import llamacpp as backend
    from shammah.engine.fast import FastDecoder
    from shammah.engine.generate import GenParams
    from shammah.engine.loader import local_dir

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = list(range(1000, 1040))
    threads = torch.get_num_threads()
    # No Qwen tokenizer offline: the embedded model's, its vocabulary padded to Qwen's 151,936 ids
    # (export._vocab); decoding from token ids, the strings never matter.
    tok = AutoTokenizer.from_pretrained(local_dir("embedded", CACHE)[1])
    print(f"random-weight models of real Qwen sizes, {tokens} new tokens, greedy, {threads} threads, median of {reps}")
    for name, kw in QWEN.items():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(**kw)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        tmp = Path(tempfile.mkdtemp())
        lora_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        with torch.no_grad():
            for n, p in lora_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.002)
        lora_model.save_pretrained(tmp / "lora")
        model = lora_model.unload()
        # llama.cpp's file: Q4_1, the same int4 groups of 32 with a min as the fast path packs
        gguf = CACHE / f"{name}-random-q4_1.gguf"
        if not gguf.is_file():
            write_gguf(model, tok, gguf, "q4_1", name=f"{name} (random weights)")
        llama = llama_cpp(gguf, ids, tokens, reps, threads)
        kernel, why = ckernel.load(CACHE)
        dec = FastDecoder(model, "int4", kernel, why)

        def fast(dec=dec):
            return timed(dec.generate(ids, tokens, -1), tokens)

        def hf_rate(m) -> float:
            x = torch.tensor([ids])
            rates = []
            for _ in range(max(1, reps - 1)):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    m.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                rates.append(tokens / (time.perf_counter() - t0))
            return statistics.median(rates)

        rows = {"shammah fast path": median_runs(fast, reps)}
        dec.set_lora("r16", tmp / "lora")
        rows["shammah fast path + LoRA r16"] = median_runs(fast, reps)
        if kernel is not None:  # the baseline for the C kernel: the LoRA in torch ops
            dec.kernel = None
            dec.set_lora("r16 (torch ops)", tmp / "lora")
            rows["  + LoRA r16 in torch ops"] = median_runs(fast, reps)
            dec.kernel = kernel
        if backend.available():
            lc = backend.LlamaCppDecoder(gguf, cfg, tmp, threads=threads, n_ctx=512)
            greedy = GenParams(max_new_tokens=tokens, temperature=0.0)

            def lcpp(lc=lc, greedy=greedy):
                lc.llm.reset()
                return timed(lc.tokens(ids, greedy, -1), tokens)

            lc.set_lora("r16", tmp / "lora")
            rows["shammah llama.cpp backend + LoRA r16"] = median_runs(lcpp, reps)
            lc.close()
        h_base = hf_rate(model)
        peft = PeftModel.from_pretrained(model, str(tmp / "lora")).eval()
        h_lora = hf_rate(peft)
        model = peft.unload()
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20

        def nbytes(lin) -> int:  # torch's packed int4, or the C copy where the CPU has the SIMD for it
            c = getattr(lin, "c", None)
            return sum(x.numel() * x.element_size() for x in vars(lin).values() if torch.is_tensor(x)) + (
                c.nbytes if c is not None else 0
            )

        lins = [lin for ly in dec.layers for lin in (ly.qkv, ly.o, ly.gate_up, ly.down)] + [dec.head]
        fast_mb = (sum(nbytes(lin) for lin in lins) + dec.embed.numel() * 2) / 2**20
        print(
            f"  {name}: weights {fast_mb:.0f} MB packed vs {weights:.0f} MB bf16, GGUF {gguf.stat().st_size / 2**20:.0f} MB"
        )
        base = None
        if llama:
            base = (statistics.median(r[0] for r in llama), statistics.median(r[1] for r in llama))
            print(
                f"    {'llama.cpp (Q4_1 GGUF)':38} first token {base[0] * 1000:5.0f} ms  {base[1]:6.1f} tok/s  (baseline)"
            )
        else:
            print("    llama.cpp baseline not installed: run with --install-llama-cpp")
        for label, (ttft, rate) in rows.items():
            vs = f"  {rate / base[1]:.2f}x llama.cpp, first token {ttft / base[0]:.2f}x" if base else ""
            print(f"    {label:38} first token {ttft * 1000:5.0f} ms  {rate:6.1f} tok/s{vs}")
        print(f"    {'transformers bf16 generate':38} {h_base:5.1f} tok/s ({h_lora:5.1f} with the LoRA)")
        # one LoRA training step as the worker takes it: fp32, batch 4 x 96 tokens, AdamW
        train = get_peft_model(model.float(), LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        opt = torch.optim.AdamW([p for p in train.parameters() if p.requires_grad], lr=1e-3)
        batch = torch.randint(0, 49152, (4, 96))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            loss = train(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        step = statistics.median(times[1:])
        print(
            f"    LoRA r16 training step (fp32, batch 4 x 96 tokens): {step:.1f} s; a chat job of 21 steps "
            f"(5 lessons + 20 anchors) trains for ~{21 * step:.0f} s"
        )
        del train, opt, model, dec, peft


if __name__ == "__main__":
    main()
