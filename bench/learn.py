"""Online-loop benchmarks (embedded model), each with a baseline from the same run:

1. feedback -> swap: from the /fix that crosses the threshold to "Learned: now answering with ...".
2. hot-swap latency: Engine.activate between two adapters of the same shape (PEFT hotswap) vs
   a fresh PeftModel load of the adapter (the baseline way to change adapters).
3. chat decode speed while a job trains: idle vs training beside it with the worker paused
   while the chat replies (shammah's default) vs no pausing.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
TEACH = [
    "What is the capital of Quenland?",
    "Which city is the capital of Quenland?",
    "Tell me the capital of Quenland.",
    "What's the capital city of Quenland?",
    "Quenland's capital is which city?",
]


def feedback_to_swap(home: Path, place: str, capital: str, learning: tuple[str, ...] = ()) -> float:
    cfg = home / "learn.toml"
    cfg.write_text(
        '[model]\nbase = "embedded"\ntemperature = 0.0\nmax_new_tokens = 24\n'
        "[learning]\nthreshold = 50\nsettle_seconds = 0.5\nrevise = false\n" + "".join(f"{kv}\n" for kv in learning)
    )
    env = dict(os.environ, SHAMMAH_HOME=str(home))
    p = subprocess.Popen(
        [PY, "-m", "shammah", "--config", str(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,  # replies; acknowledgements and job news come on stderr
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    questions = [q.replace("Quenland", place) for q in TEACH]
    for q in questions:
        p.stdin.write(f"{q}\n/critical wrong: it is {capital}\n")
        p.stdin.flush()
        while "Saved /critical" not in (line := p.stderr.readline()):
            if not line:
                raise RuntimeError("the chat ended before acknowledging /critical")
        t0 = time.perf_counter()  # the last one is the /fix below that crosses the threshold
        p.stdin.write(f"/fix The capital of {place} is {capital}.\n/clear\n")
        p.stdin.flush()
    p.stdin.close()
    elapsed = float("nan")
    for line in p.stderr:
        if "Learned:" in line or "kept the current adapter" in line or "Training failed" in line:
            elapsed = time.perf_counter() - t0
            print(f"  {line.strip()[:160]}")
            break
    chat_rss = peak_rss_gb(p.pid)  # the chat is still up: it exits once the job has ended
    p.wait()
    from shammah.adapters.registry import Registry

    info = Registry(home / "adapters").list()[-1]
    report = info.get("report", default={})
    chat = f"; the chat's own peak RSS {chat_rss:.2f} GB" if chat_rss is not None else ""
    print(f"  worker peak RSS {report.get('peak_rss_mb', 0) / 1024:.2f} GB (goal <= 2 GB){chat}")
    print("  " + breakdown(info.path / "train.log", elapsed))
    return elapsed


def peak_rss_gb(pid: int) -> float | None:
    """A running process's peak resident memory (Linux: VmHWM), None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def breakdown(log: Path, total: float) -> str:
    """Where a job's seconds went, from its own event times."""
    ev = {}
    steps = []
    for line in log.read_text().splitlines():
        e = json.loads(line)
        ev.setdefault(e["event"], e["time"])
        if e["event"] == "step":
            steps.append(e["time"])
    t0 = ev["setup"]
    parts = {
        "settle, process start, imports, swap": total - (ev["saved"] - t0),
        "model + anchors": ev["anchors"] - t0,
        "teacher/reference + trainer": ev["start"] - ev["anchors"],
        f"{len(steps)} steps": steps[-1] - ev["start"],
        "gate": ev["saved"] - steps[-1],
    }
    return "; ".join(f"{k} {v:.1f} s" for k, v in parts.items())


def swap_latency(home: Path, reps: int = 5) -> tuple[float, float]:
    import torch  # noqa: F401
    from peft import PeftModel

    from shammah.adapters.registry import Registry
    from shammah.config import ModelConfig
    from shammah.engine import Engine

    reg = Registry(home / "adapters")
    learned = [a for a in reg.list() if a.name.startswith("learned-")][-1]
    other = home / "adapters-copy"
    if not other.exists():
        import shutil

        shutil.copytree(learned.path, other)
    eng = Engine(ModelConfig(base="embedded"), home / "cache").load()
    eng.activate("a", learned.path)
    times = []
    for i in range(reps):
        times.append(eng.activate("b" if i % 2 == 0 else "a", other if i % 2 == 0 else learned.path))
    base_times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        m = PeftModel.from_pretrained(eng.loaded.model, str(learned.path), adapter_name="fresh")
        base_times.append(time.perf_counter() - t0)
        m.unload()
    return statistics.median(times), statistics.median(base_times)


def decode_during_training(home: Path) -> tuple[float, float, float]:
    from shammah.config import ModelConfig
    from shammah.engine import Engine

    eng = Engine(
        ModelConfig(base="embedded", temperature=0.0, max_new_tokens=64, repetition_penalty=1.0), home / "cache"
    ).load()
    msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]

    def rate() -> float:
        last = list(eng.stream(msgs))[-1]
        return last.new_tokens / last.seconds

    rate()
    idle_runs = [rate() for _ in range(3)]
    data = home / "bench-train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Tell me about topic {i}.", "completion": "A fine topic. " * 30}) + "\n"
            for i in range(40)
        )
    )
    env = dict(os.environ, SHAMMAH_HOME=str(home))
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
            "--name",
            f"bg-{time.time_ns()}",
            "--epochs",
            "50",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    for line in p.stdout:  # wait until it really trains
        if '"step"' in line:
            break
    shared = statistics.median(rate() for _ in range(3))
    paused = []
    for _ in range(3):  # what the chat does around every reply while a job runs
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(0.05)
        paused.append(rate())
        os.kill(p.pid, signal.SIGCONT)
        time.sleep(1)
    p.kill()
    p.wait()
    idle_runs += [rate() for _ in range(3)]  # idle before and after: the machine drifts (±35% here)
    return statistics.median(idle_runs), statistics.median(paused), shared


def run(home: Path, learning: tuple[str, ...] = (), baseline: tuple[str, ...] = (), only_swap: bool = False) -> None:
    home.mkdir(parents=True, exist_ok=True)
    print("online loop, embedded model" + (f", learning: {', '.join(learning)}" if learning else ""))
    first = feedback_to_swap(home, "Quenland", "Zorblat", learning)
    second = feedback_to_swap(home, "Vorland", "Quibbleton", learning)
    print(
        f"  feedback crossing the threshold -> swapped adapter: first job {first:5.1f} s (base-model answers "
        f"for anchors and controls computed and cached), next job {second:5.1f} s   (goal <= 30 s)"
    )
    if baseline:  # the same two lessons in a fresh home with the baseline's settings, same run
        print(f"baseline: {', '.join(baseline)}")
        b_home = home.parent / "baseline-home"
        b_home.mkdir(parents=True, exist_ok=True)
        (b_home / "cache").symlink_to(home / "cache")  # the same cached base answers as the next job above
        b = feedback_to_swap(b_home, "Marland", "Pexton", baseline)
        print(f"  baseline next job {b:5.1f} s; this setup's next job {second:5.1f} s = {second / b:.2f}x")
    if only_swap:
        return
    swap, fresh = swap_latency(home)
    print(
        # both adapters stay resident after their first load: on the fast path this is a pointer
        # swap; a new adapter's swap (loaded and converted) is the "swapped in" of the jobs above
        f"  hot-swap between two loaded adapters (chat blocked): {swap * 1000:6.1f} ms   baseline fresh PeftModel load "
        f"{fresh * 1000:6.0f} ms   ratio {swap / fresh:.2f}x   (goal < 100 ms)"
    )
    idle, paused, shared = decode_during_training(home)
    print(
        f"  chat decode: idle {idle:5.1f} tok/s   during training, worker paused while replying "
        f"{paused:5.1f} tok/s ({paused / idle:.0%})   not paused {shared:5.1f} tok/s ({shared / idle:.0%})"
    )


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a [learning] setting (TOML)")
    ap.add_argument(
        "--baseline", action="append", default=[], metavar="KEY=VALUE", help="also time a job with these settings"
    )
    ap.add_argument("--feedback-only", action="store_true", help="only the feedback -> swap figures")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shammah-bench-learn-") as tmp:
        run(Path(tmp) / "home", tuple(args.set), tuple(args.baseline), args.feedback_only)
