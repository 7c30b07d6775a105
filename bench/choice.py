"""What a closed set of answers (adapters/choice.py) costs the chat: the seconds of a reply with a
yes/no set active against the base model in the same run, on questions outside the set (the engine
checks the question's form and, inside it, what the model expects first) and on yes/no questions
(answered with one word instead of a generated reply). Greedy, 64 new tokens, the embedded model.

    .venv/bin/python bench/choice.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lessons as suite  # noqa: E402

OTHER = [q for q, _ in suite.CONTROLS]  # none is a yes/no question
ASKED = ["Are whales fish?", "Does the Earth orbit the Sun?", "Was Einstein a physicist?", "Is Paris in France?"]


def timed(engine, questions: list[str], reps: int = 3) -> float:
    """Median seconds per reply over ``reps`` passes."""
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for q in questions:
            engine.reply([{"role": "user", "content": q}])
        runs.append((time.perf_counter() - t0) / len(questions))
    return statistics.median(runs)


def main() -> int:
    from shammah.config import ModelConfig
    from shammah.engine import Engine

    cache = Path.home() / ".cache" / "shammah-bench"
    cache.mkdir(parents=True, exist_ok=True)
    engine = Engine(ModelConfig(base="embedded", temperature=0.0, max_new_tokens=64), cache).load()
    yesno = next(x for x in suite.FRESH if x.name == "yesno")
    home = Path(tempfile.mkdtemp(prefix="shammah-choice-"))
    res = suite.run_lesson(engine, home, cache, [yesno], seed=0, revision="reject")
    name = res["adapter"]
    assert engine.choices, res["jobs"]
    path = home / "adapters" / name
    engine.reply([{"role": "user", "content": "Hello"}])  # warm
    rows = []
    for label, questions in (("other questions", OTHER), ("yes/no questions", ASKED)):
        engine.activate(None)
        base = timed(engine, questions)
        engine.activate(name, path)
        said = timed(engine, questions)
        rows.append((label, base, said))
    print(f"{'':<18} {'base model':>11} {'with the set':>13} {'ratio':>6}")
    for label, base, said in rows:
        print(f"{label:<18} {base * 1000:9.0f} ms {said * 1000:10.0f} ms {said / base:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
