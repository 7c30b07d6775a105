"""Training memory on long replies (embedded model), against the same run without head slicing.

    .venv/bin/python bench/memory.py [--steps 3]

Twelve ~2.5k-character examples of the kinds the chat's loop trains on (targets, DPO pairs and
note distillation), batch 4, gradient checkpointing "auto": what a user who rated long replies
makes the worker do. Each setup trains in a fresh process (`shammah train --json`) and reports
its peak RSS and time: the baseline runs the output head over all loss positions at once
(``methods.HEAD_BUDGET`` = 2**40) with glibc's default malloc, as before this bench; then the
sliced head; then also ``trainer.return_freed_memory`` (the default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "shammah-bench"

SENTENCES = [
    "The lighthouse keeper climbed the spiral stairs before dawn to trim the wick and polish the lens.",
    "Storms came from the west in autumn, and the ships that missed the channel broke on the reef.",
    "She kept a logbook of every vessel, every gale and every quiet night when nothing happened at all.",
    "In spring the supply boat brought flour, oil, letters and sometimes a newspaper three weeks old.",
    "The light turned once every twelve seconds, and sailors knew the coast by that slow white pulse.",
]


def long_text(seed: int, chars: int = 2500) -> str:
    out, i = [], seed
    while sum(len(s) + 1 for s in out) < chars:
        out.append(f"{SENTENCES[i % len(SENTENCES)]} ({i})")
        i += 3
    return " ".join(out)


def dataset(path: Path) -> Path:
    recs = []
    for i in range(4):
        recs.append({"prompt": f"Tell me the story, part {i}.", "completion": long_text(i)})
        recs.append({"prompt": f"Retell part {i}.", "chosen": long_text(i + 10), "rejected": long_text(i + 20)})
        recs.append(
            {
                "prompt": f"Part {i} again?",
                "teacher_prompt": f"Part {i} again? (Answer in the keeper's voice.)",
                "completion": long_text(i + 30),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


SNIPPET = r"""
import sys
from shammah.training import methods, trainer
methods.HEAD_BUDGET = int(sys.argv[1])
if sys.argv[2] == "0":
    trainer.return_freed_memory = lambda: None
from shammah.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run(chunk: int, trim: bool, data: Path, steps: int, home: Path) -> dict:
    args = ["train", "--base", "embedded", "--dataset", str(data), "--max-steps", str(steps), "--yes", "--json"]
    args += ["--name", f"mem-{chunk}-{int(trim)}"]
    env = {"SHAMMAH_HOME": str(home), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    r = subprocess.run(
        [sys.executable, "-c", SNIPPET, str(chunk), str(int(trim)), *args], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        raise SystemExit(f"training failed ({r.returncode}): {r.stderr[-2000:]}")
    events = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    done = next(e for e in events if e.get("event") == "done")
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data = dataset(tmp / "long.jsonl")
    home = tmp / "home"
    home.mkdir()
    (home / "cache").symlink_to(CACHE) if CACHE.exists() else None
    results = {}
    from shammah.training.methods import HEAD_BUDGET

    setups = (
        ("before: head at once, glibc's default malloc", 2**40, False),
        ("sliced head", HEAD_BUDGET, False),
        ("sliced head + freed memory returned (default for long batches)", HEAD_BUDGET, True),
    )
    for label, chunk, trim in setups:
        rep = run(chunk, trim, data, args.steps, home)
        results[label] = rep
        print(
            f"  {label:64} peak RSS {rep['peak_rss_mb'] / 1024:.2f} GB, {rep['duration_s']:.1f} s for {rep['steps']} steps"
        )
    first, last = list(results.values())[0], list(results.values())[-1]
    print(
        f"long replies, 12 examples x ~2.5k chars, batch 4: peak RSS {last['peak_rss_mb'] / 1024:.2f} GB = "
        f"{last['peak_rss_mb'] / first['peak_rss_mb']:.2f}x the run before (goal <= 2 GB); "
        f"time {last['duration_s'] / first['duration_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
