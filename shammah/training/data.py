"""Training data: JSONL in the common formats, normalised into :class:`Example` records.

Accepted lines (optional ``weight`` > 0 and ``system`` on any of them):

- chat:        {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}
- instruction: {"instruction": ..., "input": ... (optional), "output": ...}
- completion:  {"prompt": ..., "completion": ...}
- preference:  {"prompt": ..., "chosen": ..., "rejected": ...}
- labelled:    {"prompt": ..., "completion": ..., "label": true|false}
- ranked:      {"prompt": ..., "responses": [{"text": ..., "rank": 1} | {"text": ..., "score": 0.7}, ...]}
- distill:     {"prompt": ..., "teacher_prompt": ..., "completion": ... (optional), "teacher": "current"|"base"}
  (context distillation: the model given ``prompt`` learns the teacher's token distribution given
  ``teacher_prompt``, e.g. the same question with an instruction or a correction in context; with no
  ``completion`` the teacher's own greedy answer is generated first)

``prompt`` may be a string or a list of chat messages; ``chosen``/``rejected``/``completion``
may be a string or a one-message assistant list (TRL's conversational form). Every bad
line is reported with its file and line number before anything trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shammah.errors import ShammahError

MAX_REPORTED = 20


class DataError(ShammahError):
    """Bad training data; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    kind: str  # sft | pair | unpaired | ranked | distill
    prompt: tuple[dict, ...]  # chat messages ending with the user turn
    # sft: (target,); pair: (chosen, rejected); unpaired: (completion,); ranked: best first;
    # distill: (completion,) or () until the teacher's answer is generated
    responses: tuple[str, ...]
    label: bool = True  # unpaired only: desirable?
    weight: float = 1.0
    source: str = ""  # "file:line" or "feedback:<id>"
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def _messages(value: Any, what: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{what}' is empty")
        return [{"role": "user", "content": value}]
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"'{what}' must be a string or a list of {{role, content}} messages")


def _text(value: Any, what: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{what}' must be a non-empty string")
    return value


def parse_record(rec: Any) -> Example:
    """One JSON object -> Example; raises ValueError with a short reason."""
    if not isinstance(rec, dict):
        raise ValueError("each line must be a JSON object")
    weight = rec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise ValueError(f"'weight' must be a number > 0, got {weight!r}")
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("'system' must be a string")
    sys_msgs = [{"role": "system", "content": system}] if system else []
    keys = set(rec) - {"weight", "system", "id", "meta"}

    def prompt_of(key="prompt") -> tuple[dict, ...]:
        msgs = _messages(rec[key], key)
        return tuple(sys_msgs + msgs)

    w = float(weight)
    if "messages" in keys:
        msgs = _messages(rec["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's reply (the training target)")
        if len(msgs) < 2:
            raise ValueError("'messages' needs at least a user message and the assistant reply")
        return Example("sft", tuple(sys_msgs + msgs[:-1]), (_text(msgs[-1]["content"], "assistant content"),), weight=w)
    if "instruction" in keys:
        if "output" not in rec:
            raise ValueError("an instruction line needs 'output'")
        instr = _text(rec["instruction"], "instruction")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("'input' must be a string")
        user = instr + (f"\n\n{extra}" if extra.strip() else "")
        return Example(
            "sft", tuple(sys_msgs + [{"role": "user", "content": user}]), (_text(rec["output"], "output"),), weight=w
        )
    if "prompt" not in keys:
        raise ValueError(
            "unknown format: expected messages | instruction/output | prompt/completion | prompt/chosen/rejected | "
            f"prompt/completion/label | prompt/responses (keys found: {', '.join(sorted(keys)) or 'none'})"
        )
    if "teacher_prompt" in keys:
        teacher = rec.get("teacher", "current")
        if teacher not in ("current", "base"):
            raise ValueError(f'\'teacher\' must be "current" or "base", got {teacher!r}')
        responses = (_text(rec["completion"], "completion"),) if "completion" in keys else ()
        meta = {
            "teacher_prompt": tuple(sys_msgs + _messages(rec["teacher_prompt"], "teacher_prompt")),
            "teacher": teacher,
        }
        note = rec["meta"].get("note") if isinstance(rec.get("meta"), dict) else None
        if isinstance(note, str):  # the chat's note lessons: what the teacher's answer must say
            meta["note"] = note
        return Example("distill", prompt_of(), responses, weight=w, meta=meta)
    if "chosen" in keys or "rejected" in keys:
        if not ("chosen" in keys and "rejected" in keys):
            raise ValueError("a preference line needs both 'chosen' and 'rejected'")
        chosen, rejected = _text(rec["chosen"], "chosen"), _text(rec["rejected"], "rejected")
        if chosen == rejected:
            raise ValueError("'chosen' and 'rejected' are identical")
        return Example("pair", prompt_of(), (chosen, rejected), weight=w)
    if "responses" in keys:
        return _ranked(rec, prompt_of(), w)
    if "completion" not in keys:
        raise ValueError("a prompt line needs 'completion', 'chosen'/'rejected' or 'responses'")
    completion = _text(rec["completion"], "completion")
    if "label" in keys:
        if not isinstance(rec["label"], bool):
            raise ValueError(f"'label' must be true or false, got {rec['label']!r}")
        return Example("unpaired", prompt_of(), (completion,), label=rec["label"], weight=w)
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    # the reply a correction replaces and the note it was rated down with (the chat's lessons): kept
    # for what the job reads off them (a length, a mark)
    kept = {k: meta[k] for k in ("replaces", "note") if isinstance(meta.get(k), str) and meta[k]}
    return Example("sft", prompt_of(), (completion,), weight=w, meta=kept)


def _ranked(rec: dict, prompt: tuple[dict, ...], w: float) -> Example:
    items = rec["responses"]
    if not isinstance(items, list) or len(items) < 2:
        raise ValueError("'responses' must list at least two responses")
    scored = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise ValueError(f"responses[{i}] must be an object with 'text' and 'rank' or 'score'")
        text = _text(it.get("text", it.get("response")), f"responses[{i}].text")
        if "rank" in it and isinstance(it["rank"], int) and not isinstance(it["rank"], bool):
            key = -float(it["rank"])  # rank 1 is best
        elif "score" in it and isinstance(it["score"], int | float) and not isinstance(it["score"], bool):
            key = float(it["score"])
        else:
            raise ValueError(f"responses[{i}] needs a numeric 'rank' (1 = best) or 'score' (higher = better)")
        scored.append((key, text))
    if len({k for k, _ in scored}) < 2:
        raise ValueError("'responses' all have the same rank/score: nothing to rank")
    ordered = tuple(t for _, t in sorted(scored, key=lambda x: -x[0]))
    return Example("ranked", prompt, ordered, weight=w)


def load_jsonl(path: Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples, problems = [], []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            try:
                ex = parse_record(rec)
            except ValueError as e:
                problems.append(f"{path}:{n}: {e}")
                continue
            examples.append(dataclasses.replace(ex, source=f"{path.name}:{n}"))
    if problems:
        more = f"\n  … and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(
            f"{len(problems)} bad line(s) in {path}; fix them and run again "
            "(nothing was trained):\n  " + "\n  ".join(problems[:MAX_REPORTED]) + more
        )
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def write_jsonl(examples: list[Example], path: Path) -> None:
    """Write examples in the formats above, so :func:`load_jsonl` reads back the same examples
    (the chat's job files, and anyone who wants to see or reuse what a job trained on)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for e in examples:
            rec: dict = {"prompt": list(e.prompt), "weight": e.weight, "meta": {"source": e.source}}
            if e.kind == "sft":
                rec["completion"] = e.responses[0]
                for k in ("replaces", "note"):
                    if isinstance(e.meta.get(k), str):
                        rec["meta"][k] = e.meta[k]
            elif e.kind == "pair":
                rec["chosen"], rec["rejected"] = e.responses
            elif e.kind == "unpaired":
                rec["completion"], rec["label"] = e.responses[0], e.label
            elif e.kind == "ranked":
                rec["responses"] = [{"text": t, "rank": i + 1} for i, t in enumerate(e.responses)]
            elif e.kind == "distill":
                rec["teacher_prompt"], rec["teacher"] = list(e.meta["teacher_prompt"]), e.meta["teacher"]
                if isinstance(e.meta.get("note"), str):
                    rec["meta"]["note"] = e.meta["note"]
                if e.responses:
                    rec["completion"] = e.responses[0]
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (at least one) for validation, deterministically."""
    if fraction <= 0:
        return examples, []
    if len(examples) < 2:
        raise DataError(f"val_fraction = {fraction} needs at least 2 examples; there is {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def dataset_hash(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        rec = [e.kind, e.prompt, e.responses, e.label, e.weight]
        if e.kind == "distill":
            rec += [e.meta.get("teacher_prompt"), e.meta.get("teacher")]
        h.update(json.dumps(rec, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def check_method(examples: list[Example], method: str) -> None:
    kinds = {e.kind for e in examples}
    need = {"dpo": "pair", "kto": "unpaired", "ranking": "ranked"}.get(method)
    if need and need not in kinds:
        label = {
            "pair": "preference (prompt/chosen/rejected)",
            "unpaired": "labelled (prompt/completion/label)",
            "ranked": "ranked (prompt/responses)",
        }[need]
        raise DataError(f"method = {method!r} needs {label} examples; the data has only: {', '.join(sorted(kinds))}")
