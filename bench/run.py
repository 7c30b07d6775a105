"""shammah benchmarks: each figure is printed with a baseline measured in the same run.

    .venv/bin/python bench/run.py [--quick]

1. start-up: launching `shammah` on a terminal until the prompt is drawn, vs a bare
   `python -c pass` and vs `python -c "import torch, transformers"` (what the prompt would
   cost if the model stack were imported first).
2. embedded model load: cold (GGUF dequantize + cache write) vs from the safetensors cache.
3. decode speed (bench/decode.py): the fast path and transformers' generate, with and without a
   LoRA, beside llama.cpp on the same GGUF; hot-swap latency; quality vs the float model.
4. training: `shammah train` (a fresh worker process) vs a hand-written transformers Trainer +
   PEFT script on the same model and data: start-up to the first step, and tokens/s.
5. the online loop (bench/learn.py): feedback -> swapped adapter, hot-swap latency, and chat
   decode speed while a job trains.
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


def _time_to_output(argv: list[str], needle: bytes, env: dict) -> float:
    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(argv[0], argv, env)
    buf = b""
    try:
        while needle not in buf:
            r, _, _ = select.select([fd], [], [], 30)
            if not r:
                raise TimeoutError(f"{argv} never printed {needle!r}")
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        return time.perf_counter() - t0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def _time_cmd(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def bench_startup(home: Path, reps: int) -> None:
    env = dict(os.environ, SHAMMAH_HOME=str(home), SHAMMAH_MODEL="embedded", PROMPT_TOOLKIT_NO_CPR="1")
    prompt = [_time_to_output([PY, "-m", "shammah"], "›".encode(), env) for _ in range(reps)]
    bare = [_time_cmd([PY, "-c", "pass"], env) for _ in range(reps)]
    heavy = [_time_cmd([PY, "-c", "import torch, transformers, peft"], env) for _ in range(max(1, reps // 2))]
    p, b, h = statistics.median(prompt), statistics.median(bare), statistics.median(heavy)
    print(f"start-up to a usable prompt (median of {reps})")
    print(f"  shammah prompt drawn        {p * 1000:7.0f} ms   (goal <= 300 ms)")
    print(f"  baseline: python -c pass    {b * 1000:7.0f} ms   shammah = {p / b:.1f}x bare python")
    print(f"  import torch+transformers   {h * 1000:7.0f} ms   shammah's prompt is {h / p:.1f}x sooner")


LOAD_SNIPPET = """
import sys, time
t0 = time.perf_counter()
from pathlib import Path
from shammah.config import ModelConfig
from shammah.engine import Engine
Engine(ModelConfig(base="embedded", dtype=sys.argv[2]), Path(sys.argv[1])).load()
print(time.perf_counter() - t0)
"""


def bench_load(cache: Path, reps: int) -> None:
    def once(dtype="auto") -> float:
        r = subprocess.run([PY, "-c", LOAD_SNIPPET, str(cache), dtype], capture_output=True, text=True, check=True)
        return float(r.stdout.strip().splitlines()[-1])

    cold = once()
    warm = statistics.median(once() for _ in range(reps))
    print("embedded model load, in a fresh process incl. imports")
    print(f"  cold (dequantize GGUF, write cache)  {cold:6.1f} s")
    print(f"  cached safetensors                   {warm:6.1f} s   cold/cached = {cold / warm:.1f}x")


def bench_decode(tokens: int, reps: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import decode  # bench/decode.py: the fast path and transformers beside llama.cpp

    decode.run(tokens, reps)


TRAIN_TOPICS = [
    "lighthouses",
    "sourdough bread",
    "the water cycle",
    "binary search",
    "volcanoes",
    "jazz",
    "photosynthesis",
    "chess openings",
    "the Roman roads",
    "solar panels",
]


def _train_data(path: Path) -> None:
    import json

    with path.open("w") as f:
        for t in TRAIN_TOPICS:  # ~140-token chats, like the measurements in shared/MEASURED.md
            answer = (
                f"Here is a short overview of {t}. " + f"{t.capitalize()} are a classic topic with a long "
                "history, many practical uses and a few common misconceptions worth clearing up. " * 4
            )
            f.write(json.dumps({"prompt": f"Tell me about {t}.", "completion": answer}) + "\n")


def _shammah_train(home: Path, data: Path, steps: int) -> tuple[float, float]:
    import json

    env = dict(os.environ, SHAMMAH_HOME=str(home))
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [
            PY,
            "-m",
            "shammah",
            "train",
            "--base",
            "embedded",
            "--dataset",
            str(data),
            "--json",
            "--max-steps",
            str(steps),
            "--batch-size",
            "4",
            "--name",
            f"bench-{time.time_ns()}",
            "--method",
            "sft",
            "--save-steps",
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    first = done = None
    for line in p.stdout:
        ev = json.loads(line)
        if ev["event"] == "start" and first is None:
            first = time.perf_counter() - t0
        if ev["event"] == "done":
            done = ev
    if p.wait() != 0:
        raise RuntimeError(p.stderr.read())
    return first, done["tokens_per_s"]


def _baseline_train(model_dir: Path, data: Path, steps: int) -> tuple[float, float]:
    import json

    r = subprocess.run(
        [PY, str(Path(__file__).with_name("baseline_trainer.py")), str(model_dir), str(data), str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    base = json.loads(r.stdout.strip().splitlines()[-1])
    return base["startup_s"], base["tokens_per_s"]


def bench_train(home: Path, steps: int, reps: int) -> None:
    from shammah.engine import loader
    from shammah.engine.resolve import resolve

    home.mkdir(parents=True, exist_ok=True)
    data = home / "bench-train.jsonl"
    _train_data(data)
    model_dir = loader.model_dir(resolve("embedded"), home / "cache")  # both sides start from the cached model
    ours, base = [], []
    for _ in range(reps):  # alternate, so machine noise hits both sides alike
        ours.append(_shammah_train(home, data, steps))
        base.append(_baseline_train(model_dir, data, steps))
    s_up, s_tps = statistics.median(o[0] for o in ours), statistics.median(o[1] for o in ours)
    b_up, b_tps = statistics.median(b[0] for b in base), statistics.median(b[1] for b in base)
    print(f"training, embedded model, LoRA r=16 all linear, batch 4, {steps} steps, fp32 (median of {reps})")
    print(
        f"  start-up to first step: shammah {s_up:5.1f} s       baseline Trainer script {b_up:5.1f} s"
        f"       ratio {s_up / b_up:.2f}x"
    )
    print(
        f"  throughput:             shammah {s_tps:5.0f} tok/s   baseline Trainer script {b_tps:5.0f} tok/s"
        f"   ratio {s_tps / b_tps:.2f}x (shammah's includes its epoch-end checkpoints)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", choices=("startup", "load", "decode", "train", "learn"))
    args = ap.parse_args()
    reps = 3 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="shammah-bench-") as tmp:
        home = Path(tmp) / "home"
        cache = home / "cache"
        if args.only in (None, "startup"):
            bench_startup(home, reps)
        if args.only in (None, "load"):
            bench_load(cache, max(2, reps // 2))
        if args.only in (None, "decode"):
            bench_decode(128, max(2, reps // 2))
        if args.only in (None, "train"):
            bench_train(home, 10, 2 if args.quick else 3)
        if args.only in (None, "learn"):
            sys.path.insert(0, str(Path(__file__).parent))
            import learn

            learn.run(home)


if __name__ == "__main__":
    main()
