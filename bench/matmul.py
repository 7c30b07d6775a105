"""The int4 matmul alone: engine/ckernel.py's C kernel against torch's int4 kernel, same weights.

    .venv/bin/python bench/matmul.py [--reps 20]

For the weight shapes of Qwen3-0.6B, Qwen2.5-0.5B and the embedded SmolLM2-135M (fused q/k/v,
o, fused gate/up, down, and the embedded output head), and for 1 row of x (a decode token), 40
(a short prompt) and 200: the best of ``--reps`` wall times of y = x W^T with fp32 x in and fp32
y out, as the fast path calls each, and GFLOP/s. torch's kernel (``_weight_int4pack_mm_for_cpu``)
takes bf16 x, so its time includes the conversions the fast path made around it; both use the
threads torch has (``torch.get_num_threads()``). Also each one's error against the same int4
weights in fp32 (the C kernel takes x in two int8 passes per 16 values and keeps its scales in
fp16; torch rounds x to bf16).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHE = Path.home() / ".cache" / "shammah-bench"
SHAPES = {  # (k, n): input and output features of the fast path's fused matmuls
    "Qwen3-0.6B": [(1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024)],
    "Qwen2.5-0.5B": [(896, 1152), (896, 896), (896, 9728), (4864, 896)],
    "SmolLM2-135M": [(576, 1152), (576, 576), (576, 3072), (1536, 576), (576, 49152)],
}
NAMES = ["q/k/v", "o", "gate/up", "down", "head"]


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 40, 200])
    args = ap.parse_args()
    import torch

    from shammah.engine import ckernel
    from shammah.engine.fast import Int4Linear, int4_groups

    kernel, why = ckernel.load(CACHE)
    if kernel is None or not kernel.has_q4:
        sys.exit(f"no C int4 kernel here: {why or 'the CPU lacks the integer SIMD it needs'}")
    torch.manual_seed(0)
    print(f"int4 matmul, C kernel vs torch's, {torch.get_num_threads()} threads, best of {args.reps}")
    ratios = {t: [] for t in args.rows}
    for model, shapes in SHAPES.items():
        print(model)
        for name, (k, n) in zip(NAMES, shapes, strict=False):
            w = torch.randn(n, k) * 0.02
            c, th = Int4Linear(w, kernel=kernel), Int4Linear(w)
            q, scale, lo = int4_groups(w)  # the weights both kernels hold, in fp32
            wq = (q.view(n, k // 32, 32) * scale[..., None] + lo[..., None]).reshape(n, k)
            for t in args.rows:
                x = torch.randn(t, k)
                want = x @ wq.t()
                err = [((f.mm(x) - want).norm() / want.norm()).item() for f in (c, th)]
                tc, tt = (best(lambda f=f, x=x: f.mm(x), args.reps) for f in (c, th))
                flop = 2 * k * n * t
                ratios[t].append(tt / tc)
                print(
                    f"  {name:8} {k:5}x{n:<6} rows {t:4}: C {tc * 1e3:7.3f} ms ({flop / tc / 1e9:4.0f} GFLOP/s, err {err[0]:.2%})"
                    f"  torch {tt * 1e3:7.3f} ms ({flop / tt / 1e9:4.0f} GFLOP/s, err {err[1]:.2%})  {tt / tc:4.2f}x"
                )
    for t, r in ratios.items():
        r.sort()
        print(f"rows {t:4}: C vs torch, median {r[len(r) // 2]:.2f}x (range {r[0]:.2f}-{r[-1]:.2f}x)")


if __name__ == "__main__":
    main()
