"""An optional decode backend: llama.cpp (``pip install 'shammah[llama]'``), with the active
adapter applied as a GGUF LoRA.

Where llama-cpp-python is installed, the chat decodes with llama.cpp on the base's GGUF (the
embedded model's own file; a transformers base is written once as a Q8_0 GGUF into the cache)
and each LoRA adapter, converted once to a GGUF LoRA (adapters.export.write_lora_gguf, cached by
path and modification time), is switched in between replies with ``llama_set_adapters_lora``: no
reload of the base. transformers stays the training engine and the fallback for what llama.cpp
cannot run (DoRA, IA³, per-layer ranks). Same surface as engine.fast.FastDecoder: ``set_lora``,
``lora_name``, ``generate`` (token ids), ``lock``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from shammah.engine.fast import AdapterUnsupported, resident_key

log = logging.getLogger(__name__)

RESIDENT = 4  # GGUF LoRAs kept initialised (a server alternating between adapters swaps a pointer)
HF_GGUF_TYPE = "q8_0"  # a transformers base, written for llama.cpp: same greedy text as F16 at half the size


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# A native llama.cpp build uses every instruction the CPU lists. Some VMs list AMX but trap on its
# tile instructions (measured on a 2-core Xeon VM: SIGILL in libggml-cpu on the first prompt of
# more than a few tokens), and a signal like that takes the whole chat down with it, unreported.
# So llama.cpp answers a 64-token prompt in a child process first, once per build of llama.cpp.
PROBE = (
    "import sys; from llama_cpp import Llama; "
    "Llama(sys.argv[1], n_ctx=256, n_threads=1, verbose=False)('word ' * 64, max_tokens=2)"
)
REBUILD = (
    "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' "
    "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python"
)


def _build_stamp() -> str:
    """What tells one build of llama-cpp-python from another: its libraries' paths and times."""
    try:
        import llama_cpp

        libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("*"))
    except ImportError:
        libs = []
    return "|".join(f"{f}:{f.stat().st_mtime_ns}" for f in libs)


def probe(gguf: Path, cache: Path) -> str | None:
    """Why llama.cpp cannot run ``gguf`` on this machine (None: it answered), tried in a child
    process. A success is remembered for this build and file; a failure is tried again next time
    (the user may have rebuilt it)."""
    key = hashlib.sha256(f"{_build_stamp()}|{Path(gguf).resolve()}".encode()).hexdigest()[:16]
    mark = Path(cache) / "llamacpp" / f"probe-{key}.ok"
    if mark.is_file():
        return None
    try:
        r = subprocess.run([sys.executable, "-c", PROBE, str(gguf)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "llama.cpp did not answer a 64-token prompt within 10 minutes"
    if r.returncode == 0:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        return None
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        return (
            f"llama.cpp crashed on this CPU ({sig}; a build for instructions this machine traps, "
            f"e.g. AMX in a VM); rebuild it without them: {REBUILD}"
        )
    last = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    return f"llama.cpp could not run {Path(gguf).name}: {last}"


def base_gguf(spec, model_dir: Path, model, tokenizer, cache: Path) -> Path:
    """The GGUF llama.cpp runs: the base's own file, else one written from the transformers
    model once (cached by the model directory and type)."""
    if spec.kind == "gguf":
        return Path(spec.source) / spec.gguf_file
    from shammah.adapters.export import write_gguf

    key = hashlib.sha256(f"{Path(model_dir).resolve()}|{HF_GGUF_TYPE}".encode()).hexdigest()[:16]
    target = cache / "llamacpp" / f"base-{key}-{HF_GGUF_TYPE}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing %s for llama.cpp", target)
        write_gguf(model, tokenizer, target, HF_GGUF_TYPE, name=spec.name)
    return target


class LlamaCppDecoder:
    def __init__(self, gguf: Path, hf_config, cache: Path, threads: int = 0, n_ctx: int = 4096):
        from llama_cpp import Llama

        threads = threads or os.cpu_count() or 1
        self.gguf, self.hf_config, self.cache = Path(gguf), hf_config, Path(cache)
        n_ctx = min(n_ctx, int(getattr(hf_config, "max_position_embeddings", n_ctx) or n_ctx))
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.label = f"llama.cpp on {self.gguf.name}, LoRA as GGUF"  # what /status says of this path
        self.lora_name: str | None = None
        self._adapter = None  # the active llama_adapter_lora_p
        self._resident: dict[tuple, object] = {}
        self.lock = threading.Lock()

    def close(self) -> None:
        import llama_cpp

        for a in self._resident.values():
            llama_cpp.llama_adapter_lora_free(a)
        self._resident.clear()
        self.llm.close()

    # adapters ----------------------------------------------------------------------------------
    def _gguf_lora(self, name: str, path: Path) -> Path:
        """The adapter as a GGUF LoRA, converted once per version of its weights."""
        from shammah.adapters.export import ExportError, engines_note, write_lora_gguf
        from shammah.adapters.registry import AdapterInfo, check_lora

        cfg = check_lora(path)
        if engines_note(cfg) or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise AdapterUnsupported("llama.cpp applies plain LoRA only")
        f = path / "adapter_model.safetensors"
        key = hashlib.sha256(f"{path.resolve()}|{f.stat().st_mtime_ns}|{f.stat().st_size}".encode()).hexdigest()[:16]
        target = self.cache / "llamacpp" / f"lora-{key}.gguf"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                write_lora_gguf(AdapterInfo(name, path, {}), self.hf_config, target, "f32")
            except ExportError as e:
                raise AdapterUnsupported(str(e)) from None
        return target

    def set_lora(self, name: str | None, path: Path | None) -> None:
        """Answer with LoRA ``name`` (None: the base alone) from the next reply on."""
        import llama_cpp

        adapter = None
        if path is not None:
            path = Path(path)
            key = resident_key(name, path)
            adapter = self._resident.pop(key, None)
            if adapter is None:
                gguf = self._gguf_lora(name or "adapter", path)
                adapter = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(gguf).encode())
                if not adapter:
                    raise ValueError(f"llama.cpp could not load {gguf}")
            self._resident[key] = adapter
        with self.lock:  # never between two tokens of a reply
            if adapter is not None:
                arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
                scales = (ctypes.c_float * 1)(1.0)
                rc = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, arr, 1, scales)
            else:
                rc = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
            if rc:
                raise ValueError(f"llama.cpp refused adapter {name!r} (code {rc})")
            self._adapter, self.lora_name = adapter, name
            self.llm.reset()  # the KV cache was computed with the other weights
        while len(self._resident) > RESIDENT:  # the oldest, never the one just made active
            llama_cpp.llama_adapter_lora_free(self._resident.pop(next(iter(self._resident))))

    # decoding ------------------------------------------------------------------------------------
    def tokens(
        self, prompt: list[int], params, eos: int | set[int], stop: threading.Event | None = None
    ) -> Iterator[int]:
        """Token ids, one at a time, ending after EOS (yielded), ``max_new_tokens`` or ``stop``;
        llama.cpp samples with ``params`` (temperature 0 = greedy)."""
        eos = {eos} if isinstance(eos, int) else set(eos)
        greedy = params.temperature <= 0
        with self.lock:
            if params.seed >= 0:
                self.llm.set_seed(params.seed)
            tokens = self.llm.generate(
                prompt,
                temp=0.0 if greedy else params.temperature,
                top_k=1 if greedy else params.top_k,
                top_p=1.0 if greedy else params.top_p,
                repeat_penalty=params.repetition_penalty,
                reset=True,
            )
            n = 0
            for tok in tokens:
                if stop is not None and stop.is_set():
                    return
                n += 1
                yield int(tok)
                if tok in eos or n >= params.max_new_tokens:
                    return
