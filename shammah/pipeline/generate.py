"""The generate stage: the teacher turns the schema into N diverse, validated examples.

Each batch asks for examples of one kind (a fully specified request; one that leans on earlier
context; a negative: a required argument missing, or not a request for this tool), chosen so the
accepted examples follow the configured mix. After every batch, one JSON line (what was accepted,
what was dropped and why) is appended to ``progress.jsonl`` and fsynced: a run killed at any
moment resumes after the last whole batch; ``--force`` starts fresh. Nothing the teacher says is
trusted: invalid JSON, answers that break the schema, and near-duplicate inputs are dropped, and
the report says how many of each.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shammah.pipeline.schema import Schema, check_output
from shammah.pipeline.teacher import Teacher, TeacherError, parse_json

KINDS = {
    "positive": "requests that fully specify one command (every required argument given)",
    "context": (
        "requests that only make sense with an earlier line of conversation, given as 'context' "
        "(e.g. context: 'I keep my notes about the trip under travel', request: 'pin that one')"
    ),
    "negative": (
        "requests the tool cannot run as they are: a required argument is missing (answer "
        '{"clarify": "<the question to ask>"}) or the request is not for this tool at all (answer '
        '{"error": "<why>"})'
    ),
}
DUPLICATE_JACCARD = 0.85  # word-set overlap at which two inputs count as the same request


@dataclass
class Progress:
    accepted: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    batches: int = 0


def read_progress(path: Path) -> Progress:
    """Every whole batch line of the progress file (a line cut by a kill is ignored)."""
    p = Progress()
    if not path.is_file():
        return p
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the half-written last line of a killed run
        p.batches += 1
        p.accepted += rec["accepted"]
        p.dropped.update(rec["dropped"])
        p.kinds.update(x["kind"] for x in rec["accepted"])
    return p


def _append(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def is_duplicate(text: str, seen: list[frozenset[str]]) -> bool:
    w = _words(text)
    if not w:
        return True
    return any(len(w & s) / len(w | s) >= DUPLICATE_JACCARD for s in seen)


def next_kind(mix: dict[str, float], counts: Counter) -> str:
    """The kind furthest behind its share of the accepted examples."""
    total = sum(counts.values()) + 1
    return max(mix, key=lambda k: (mix[k] * total - counts[k], mix[k]))


SCHEMA_FAULTS = {
    "unknown command": "unknown command",
    "unknown subcommand": "unknown subcommand",
    "unknown argument": "unknown argument",
    "required argument": "required argument missing",
    "argument": "wrong argument type",
}


def _category(why: str) -> str:
    """A schema fault's kind, for the report's counts (the detail is in the progress file)."""
    return next((v for k, v in SCHEMA_FAULTS.items() if why.startswith(k)), why)


def batch_prompt(schema: Schema, kind: str, k: int, avoid: list[str]) -> tuple[str, str]:
    system = "You write training data for a small model that turns requests into JSON commands for a tool."
    ctx = ', "context": "<the earlier line>"' if kind == "context" else ""
    avoid_s = "\n".join(f"- {a}" for a in avoid[-15:]) or "- (none yet)"
    user = (
        f"The tool:\n{schema.as_text()}\n\n"
        'A command is answered as {"command": ..., "subcommand": ..., "args": {...}} with argument values '
        "of the declared types.\n\n"
        f"Write {k} diverse examples of {KINDS[kind]}. Vary wording, length and the commands used.\n"
        f"Do not repeat these requests:\n{avoid_s}\n\n"
        f'Return only a JSON array; each element: {{"input": "<the request>"{ctx}, "output": <the answer>}}.'
    )
    return system, user


def validate(schema: Schema, kind: str, item, seen: list[frozenset[str]]) -> tuple[dict | None, str | None]:
    """(the example, None) or (None, why it is dropped)."""
    if not isinstance(item, dict) or not isinstance(item.get("input"), str) or "output" not in item:
        return None, "malformed example (needs input and output)"
    text = item["input"].strip()
    if not text:
        return None, "empty input"
    context = item.get("context")
    if kind == "context" and not (isinstance(context, str) and context.strip()):
        return None, "context example without context"
    why = check_output(schema, item["output"])
    if why:
        return None, f"schema: {_category(why)}"
    out = item["output"]
    is_negative = set(out) <= {"clarify", "error"}
    if (kind == "negative") != is_negative:
        return None, "answer does not fit the kind asked for"
    if is_duplicate(text, seen):
        return None, "near-duplicate input"
    ex = {"kind": kind, "input": text, "output": out}
    if kind == "context":
        ex["context"] = context.strip()
    return ex, None


def generate(
    schema: Schema,
    teacher: Teacher,
    data_dir: Path,
    n: int,
    batch_size: int,
    mix: dict[str, float],
    say=lambda msg: None,
) -> Progress:
    """Ask for batches until ``n`` examples are accepted (resuming from the progress file)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "progress.jsonl"
    prog = read_progress(path)
    if prog.accepted:
        say(f"resuming: {len(prog.accepted)} examples from {prog.batches} batches in {path}")
    seen = [_words(x["input"]) for x in prog.accepted]
    most = prog.batches + 3 * (-(-max(n - len(prog.accepted), 0) // batch_size)) + 2  # stop feeding a bad teacher
    while len(prog.accepted) < n and prog.batches < most:
        kind = next_kind(mix, prog.kinds)
        k = min(batch_size, n - len(prog.accepted))
        system, user = batch_prompt(schema, kind, k, [x["input"] for x in prog.accepted])
        answer = teacher.ask(system, user)
        accepted, dropped = [], Counter()
        try:
            items = parse_json(answer)
            if not isinstance(items, list):
                raise ValueError("not a JSON array")
        except ValueError:
            items, dropped["teacher answer is not a JSON array"] = [], 1
        for item in items[: k * 2]:  # a teacher that returns far more than asked gets no bonus
            ex, why = validate(schema, kind, item, seen)
            if ex is None:
                dropped[why] += 1
                continue
            seen.append(_words(ex["input"]))
            accepted.append(ex)
        accepted = accepted[: n - len(prog.accepted)]
        _append(path, {"batch": prog.batches, "kind": kind, "accepted": accepted, "dropped": dict(dropped)})
        prog.batches += 1
        prog.accepted += accepted
        prog.dropped.update(dropped)
        prog.kinds.update(x["kind"] for x in accepted)
        say(f"batch {prog.batches} ({kind}): +{len(accepted)}, {len(prog.accepted)}/{n}")
    if not prog.accepted:
        raise TeacherError("the teacher produced no valid example; see the dropped reasons in the report")
    return prog


def prompt_text(ex: dict) -> str:
    return f"Earlier: {ex['context']}\nRequest: {ex['input']}" if ex.get("context") else ex["input"]


def record(schema: Schema, ex: dict) -> dict:
    """An SFT line: the schema in the system prompt, the request, the JSON answer."""
    return {
        "system": f"{schema.system}\n\n{schema.as_text()}",
        "prompt": prompt_text(ex),
        "completion": json.dumps(ex["output"], ensure_ascii=False),
    }


def finalize(schema: Schema, prog: Progress, data_dir: Path, seed: int = 0, held_out: float = 0.1) -> dict:
    """train.jsonl, train_val.jsonl (evaluation only) and pref_inputs.jsonl (preference inputs,
    held out of SFT); report.json."""
    from shammah.paths import atomic_write

    rows = list(prog.accepted)
    random.Random(seed).shuffle(rows)
    k = max(1, round(len(rows) * held_out)) if len(rows) >= 6 else 1
    parts = {"train_val.jsonl": rows[:k], "pref_inputs.jsonl": rows[k : 2 * k], "train.jsonl": rows[2 * k :]}
    for name, part in parts.items():
        atomic_write(data_dir / name, "".join(json.dumps(record(schema, x), ensure_ascii=False) + "\n" for x in part))
    report = {
        "accepted": len(prog.accepted),
        "batches": prog.batches,
        "kinds": dict(prog.kinds),
        "dropped": dict(prog.dropped.most_common()),
        "split": {name: len(part) for name, part in parts.items()},
    }
    atomic_write(data_dir / "report.json", json.dumps(report, indent=2))
    return report
