"""Load a resolved model and tokenizer with transformers (imports torch).

GGUF files are dequantized once and cached as safetensors under the cache dir
(keyed by the file's path, size and mtime), so later starts skip the slow
conversion: ~23 s from GGUF vs ~6 s from the cache on a 2-core CPU.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from shammah.engine.resolve import ModelSpec
from shammah.errors import ModelError
from shammah.paths import ensure_dir

log = logging.getLogger(__name__)

# transformers' from_pretrained builds the model under process-global state (meta-device
# initialisation); two loads on different threads at once corrupt each other
# ("Cannot copy out of meta tensor"). Loads are rare, so serialise them.
LOAD_LOCK = threading.Lock()


@dataclass
class Loaded:
    model: object
    tokenizer: object
    device: str
    dtype: str
    path: str  # directory the weights were read from


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ModelError("model.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ModelError("model.device = 'mps' but Apple MPS is not available; use 'auto' or 'cpu'")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    # On CPUs with native bf16 (AVX512-BF16/AMX) decode is memory-bound and bf16 halves the bytes:
    # measured 16-23 tok/s vs 11-15 for fp32 on the embedded model. Elsewhere bf16 is emulated and slow.
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "bfloat16"
    except (AttributeError, RuntimeError):
        pass
    return "float32"


def gguf_cache_dir(cache: Path, gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache / "models" / f"{gguf_path.stem}-{key}"


def _clear_gguf_quantizer(model) -> None:
    # After a GGUF load the weights are plain floats, but the model still carries transformers'
    # GGUF quantizer and save_pretrained refuses ("quantized with gguf and is not serializable").
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize ``gguf_path`` into a safetensors model directory at ``target`` (atomically)."""
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s", gguf_path, target)
    d, f = str(gguf_path.parent), gguf_path.name
    # transformers draws a raw tqdm bar here that ignores its own progress-bar switch and would
    # garble the chat prompt (the load runs behind it); the chat shows its own spinner instead.
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"could not read GGUF file {gguf_path}: {e}") from e
    finally:
        gguf_utils.tqdm = bar
    _clear_gguf_quantizer(model)
    ensure_dir(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:
            reason = type(e).__name__
    raise ModelError(
        f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded ({reason}). "
        'Set model.base = "embedded" (or SHAMMAH_MODEL=embedded) to use the built-in model offline.'
    )


def local_dir(base: str, cache: Path) -> tuple[ModelSpec, Path]:
    """(spec, transformers directory) of the base named ``base`` (config model.base syntax),
    converted or fetched once; for the commands that read a base without the chat engine."""
    from shammah.engine.resolve import resolve

    spec = resolve(base)
    with LOAD_LOCK:
        return spec, model_dir(spec, cache)


def model_dir(spec: ModelSpec, cache: Path) -> Path:
    """The directory of a transformers model for ``spec``, converting/fetching if needed."""
    if spec.kind == "gguf":
        gguf = Path(spec.source) / spec.gguf_file
        target = gguf_cache_dir(cache, gguf)
        if not (target / "config.json").exists():
            convert_gguf(gguf, target)
        return target
    if spec.kind == "hub":
        return hub_snapshot(spec.source)
    return Path(spec.source)


def load(spec: ModelSpec, *, cache: Path, device: str = "auto", dtype: str = "auto", threads: int = 0) -> Loaded:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # Library deprecation notes are not the user's business and would land in the middle of the chat.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|transformers|torch)\.")
    if threads > 0:
        torch.set_num_threads(threads)
    with LOAD_LOCK:
        return _load_locked(spec, cache, device, dtype)


def _load_locked(spec: ModelSpec, cache: Path, device: str, dtype: str) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(spec, cache)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dt))
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the model from {path}: {e}") from e
    if tok.chat_template is None:
        raise ModelError(f"{spec.name} has no chat template; use an instruct/chat model")
    model.to(dev)
    model.eval()
    return Loaded(model, tok, dev, dt, str(path))
