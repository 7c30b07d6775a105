"""From ratings to training examples — the feedback contract (see README, "How it learns").

| rating                       | becomes                                                      |
|------------------------------|--------------------------------------------------------------|
| /good                        | SFT target (the reply)                                       |
| /fix <answer>                | SFT target (the answer) + pair (chosen = answer, rejected = reply) |
| /medium, /critical + a fix   | the same, the fix being /fix or an accepted rewrite          |
| /medium, /critical, no fix   | an undesirable example (KTO); the reply is never a target    |

The prompt is the turn's system prompt and user message as the model saw them (earlier
turns of the conversation are left out: a lesson should hold in a new conversation, and
history would make every example several times longer to train). A rewrite that was guided
by the note is therefore trained *without* the note: the adapter has to internalise it.
Each example carries its rating's weight, which the trainer uses as sampling probability.
"""

from __future__ import annotations

import json
from pathlib import Path

from shammah.feedback.store import Feedback, Store
from shammah.training.data import Example


def lesson_prompt(f: Feedback) -> tuple[dict, ...]:
    system = [m for m in f.messages[:1] if m.get("role") == "system"]
    return tuple(system) + ({"role": "user", "content": f.prompt},)


def examples_for(f: Feedback) -> list[Example]:
    prompt = lesson_prompt(f)
    src = f"feedback:{f.id}"
    if f.rating == "good":
        return [Example("sft", prompt, (f.reply,), weight=f.weight, source=src)] if f.reply.strip() else []
    if f.fix:
        out = [Example("sft", prompt, (f.fix,), weight=f.weight, source=src)]
        if f.reply.strip() and f.reply.strip() != f.fix.strip():
            out.append(Example("pair", prompt, (f.fix, f.reply), weight=f.weight, source=src))
        return out
    if f.reply.strip():  # negative without a usable revision: only "don't say this"
        return [Example("unpaired", prompt, (f.reply,), label=False, weight=f.weight, source=src)]
    return []


def compile_feedback(store: Store, replay_limit: int) -> tuple[list[Example], list[int], list[int]]:
    """(examples, ids of new feedback, ids of replayed feedback) for the next training run."""
    new = store.pending_feedback()
    old = store.trained_feedback(replay_limit) if replay_limit else []
    examples = [e for f in old + new for e in examples_for(f)]
    return examples, [f.id for f in new], [f.id for f in old]


def to_jsonl(examples: list[Example], path: Path) -> None:
    """Write examples in shammah's JSONL data formats (what `shammah train` reads)."""
    with path.open("w", encoding="utf-8") as fh:
        for e in examples:
            rec: dict = {"prompt": list(e.prompt), "weight": e.weight, "meta": {"source": e.source}}
            if e.kind == "sft":
                rec["completion"] = e.responses[0]
            elif e.kind == "pair":
                rec["chosen"], rec["rejected"] = e.responses
            elif e.kind == "unpaired":
                rec["completion"], rec["label"] = e.responses[0], e.label
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
