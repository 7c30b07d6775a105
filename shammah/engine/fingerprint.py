"""A cheap, weight-sensitive fingerprint of a base model's safetensors files.

Hashing every byte of a multi-GB model on each start would cost seconds, so the
fingerprint covers each file's safetensors header (every tensor's name, dtype,
shape and offsets) plus 64 evenly spaced 64 KiB samples of the weight bytes.
Any re-quantisation, fine-tune or different checkpoint changes it.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

SAMPLES = 64
SAMPLE_BYTES = 64 * 1024


def fingerprint(model_dir: Path | str) -> str:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(n))  # the JSON header
            start = 8 + n
            span = max(size - start - SAMPLE_BYTES, 0)
            for i in range(SAMPLES):
                fh.seek(start + span * i // max(SAMPLES - 1, 1))
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:32]
