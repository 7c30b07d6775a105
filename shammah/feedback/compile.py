"""From ratings to training examples — the feedback contract (see README, "How it learns").

The unit is the **turn**, not the rating: users rate in any order (`/fix` then `/critical`,
`/good` then `/critical`, a rewrite then `/edit`), and every turn compiles to exactly one
:class:`Lesson`:

- its **latest** rating decides whether the reply was good (`/good`) or bad (`/medium`,
  `/critical`, or a `/fix`, which says the reply should have been something else);
- a good reply is the target; a bad reply is **never** a target, in new data or in replay;
- the target of a bad reply is the best correction the turn has, whichever came first:
  the person's own words (`/fix`, `/edit`) beat a rewrite they accepted, which beats a rewrite
  accepted by a rule without being seen (piped input); the latest of a kind wins;
- a bad reply with a target trains the target (SFT) plus a preference pair (target over the
  reply, DPO); with no target but a note it learns the note by **context distillation**
  (``learning.note_only = "distill"``): the current model's answer *with the note in its
  context* is the teacher for the model without it — the model's own, unseen text is never a
  hard target, only its distribution given what the user said (and only where that answer says
  what the note names: a job drops the rest, training/online.py drop_unfollowed); with neither (or
  ``note_only = "avoid"``) it is an unpaired "undesirable" example (KTO);
- the weight is the good weight for a good reply, else the heaviest rating the turn got
  (`/fix` then `/critical` weighs 10), but a rewrite nobody saw never weighs more than a `/fix`.

The prompt is the turn's system prompt and user message as the model saw them (earlier
turns of the conversation are left out: a lesson should hold in a new conversation, and
history would make every example several times longer to train). A rewrite that was guided
by the note is therefore trained *without* the note: the adapter has to internalise it.
Each example carries its turn's weight, which the trainer uses as sampling probability.
"""

from __future__ import annotations

from dataclasses import dataclass

from shammah.adapters.rule import noted
from shammah.config import FeedbackConfig
from shammah.feedback.revise import stated_answer
from shammah.feedback.store import NEGATIVE, Feedback, Store
from shammah.training.data import Example

# Who wrote a correction, most trusted first: the person's own words, a rewrite they saw and
# accepted, a rewrite accepted by learning.revision_noninteractive without being seen.
TRUST = ("user", "edit", "revision", "revision-auto")


@dataclass(frozen=True)
class Lesson:
    """One rated turn and the single decision it compiles to."""

    turn_id: int
    prompt: tuple[dict, ...]
    reply: str
    rating: str  # the deciding (latest) rating: good | medium | critical | fix
    target: str | None  # good: the reply; bad: the best correction, or None
    source: str  # reply | user | edit | revision | revision-auto | none
    weight: float
    feedback_ids: tuple[int, ...]
    ratings: tuple[str, ...]  # every rating of the turn, in order
    trained: bool  # every rating of the turn is already in an adapter
    note: str | None = None  # the latest note of a bad rating

    def teacher_prompt(self) -> tuple[dict, ...]:
        """The prompt with the note in context (the system message), for context distillation."""
        said = f"Feedback on your earlier answers: {self.note}"
        if self.prompt and self.prompt[0].get("role") == "system":
            first = {"role": "system", "content": f"{self.prompt[0]['content']}\n\n{said}"}
            return (first,) + self.prompt[1:]
        return ({"role": "system", "content": said},) + self.prompt

    @property
    def good(self) -> bool:
        return self.rating == "good"

    def examples(self, note_only: str = "distill") -> list[Example]:
        src = f"turn:{self.turn_id}"
        if self.target is None and self.note and note_only == "distill":
            # the note itself travels too: a job trains the teacher's answer only where it says what
            # the note says (training/online.py drop_unfollowed)
            meta = {"teacher_prompt": self.teacher_prompt(), "teacher": "current", "note": self.note}
            return [Example("distill", self.prompt, (), weight=self.weight, source=src, meta=meta)]
        if self.target is None:  # a bad reply and nothing better: only "don't say this"
            if not self.reply.strip():
                return []
            return [Example("unpaired", self.prompt, (self.reply,), label=False, weight=self.weight, source=src)]
        if self.good or not self.reply.strip() or self.reply.strip() == self.target.strip():
            return [Example("sft", self.prompt, (self.target,), weight=self.weight, source=src)]
        # the target over the reply it replaces: SFT (which keeps the reply it corrects: a job reads
        # a length off the corrections, adapters/rule.py), with the note the turn was rated down with
        # (a mark it asks for: "write numbers as numerals"), and a preference pair
        meta = {"replaces": self.reply, **({"note": self.note} if self.note else {})}
        return [
            Example("sft", self.prompt, (self.target,), weight=self.weight, source=src, meta=meta),
            Example("pair", self.prompt, (self.target, self.reply), weight=self.weight, source=src),
        ]

    def teaches(self, note_only: str = "distill") -> str:
        """What this turn teaches, in a few words (for /feedback show)."""
        if self.good:
            return f"learn the reply: {self.target}"
        if self.target is None and self.note and note_only == "distill":
            # what a job will make of the note (adapters/rule.py noted_rule, training/online.py
            # drop_unfollowed): a rule the engine writes, else the model's answer with it in mind,
            # else (the model does not say it) the answer the note states, in the user's words
            if (rule := noted(self.note)) is not None:
                return f"a rule once notes on 3 questions ask it (every reply {rule.describe()}): {self.note}"
            if stated := stated_answer(self.note, self.prompt[-1]["content"] if self.prompt else ""):
                return f"learn your note (its own answer with the note in mind, else as you wrote it): {stated}"
            return f"learn your note (its own answer with the note in mind): {self.note}"
        if self.target is None:
            return f"avoid the reply: {self.reply}"
        who = {"user": "your fix", "edit": "your edit", "revision": "the rewrite you accepted"}
        return f"learn {who.get(self.source, 'the unseen rewrite')}: {self.target}  (over the reply: {self.reply})"


def lesson_prompt(f: Feedback) -> tuple[dict, ...]:
    system = [m for m in f.messages[:1] if m.get("role") == "system"]
    return tuple(system) + ({"role": "user", "content": f.prompt},)


def decide(items: list[Feedback], weights: FeedbackConfig) -> Lesson:
    """The one decision for a turn's ratings (``items`` in the order they were given)."""
    items = sorted(items, key=lambda f: f.id)
    first, latest = items[0], items[-1]
    fixes = [
        (TRUST.index(f.fix_source or "user"), -(f.changed_at or f.created_at), f.fix, f.fix_source or "user")
        for f in items
        if f.fix and f.fix.strip()
    ]
    if latest.rating == "good":
        target, source, weight = first.reply, "reply", latest.weight
    else:
        weight = max(f.weight for f in items if f.rating in NEGATIVE + ("fix",))
        if fixes:
            _, _, target, source = min(fixes)
            if source == "revision-auto":
                weight = min(weight, weights.fix_weight)
        else:
            target, source = None, "none"
    if target is not None and not target.strip():
        target = None
    notes = [f.note.strip() for f in items if f.rating in NEGATIVE and f.note and f.note.strip()]
    return Lesson(
        turn_id=first.turn_id,
        prompt=lesson_prompt(first),
        reply=first.reply,
        rating=latest.rating,
        target=target,
        source=source,
        weight=weight,
        feedback_ids=tuple(f.id for f in items),
        ratings=tuple(f.rating for f in items),
        trained=all(f.trained_in is not None for f in items),
        note=notes[-1] if notes and latest.rating != "good" else None,
    )


def lessons(store: Store) -> list[Lesson]:
    """One lesson per rated turn, oldest turn first."""
    by_turn: dict[int, list[Feedback]] = {}
    for f in store.list_feedback():
        by_turn.setdefault(f.turn_id, []).append(f)
    return [decide(items, store.weights) for _, items in sorted(by_turn.items())]


def compile_feedback(store: Store, replay_limit: int) -> tuple[list[Lesson], list[Lesson]]:
    """(new lessons, replayed lessons) for the next training run: a turn with any rating not yet
    trained is new (all its ratings decide again); up to ``replay_limit`` fully trained turns,
    the most recent, are replayed so earlier lessons are not forgotten."""
    every = lessons(store)
    new = [x for x in every if not x.trained]
    old = [x for x in every if x.trained]
    return new, old[-replay_limit:] if replay_limit else []


@dataclass(frozen=True)
class Buffer:
    """What the next training run would learn: rated turns not yet in an adapter."""

    examples: int
    weighted: float

    def __str__(self) -> str:
        return (
            f"Training buffer: {self.examples} example{'s' if self.examples != 1 else ''} ({self.weighted:g} weighted)"
        )


def buffer(store: Store) -> Buffer:
    new, _ = compile_feedback(store, 0)
    return Buffer(len(new), sum(x.weight for x in new))


def examples_of(items: list[Lesson], note_only: str = "distill") -> list[Example]:
    return [e for x in items for e in x.examples(note_only)]
