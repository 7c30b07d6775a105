"""Answers from a closed set: a user who fixes six replies to "Is the sun a star?", "Can fish fly?"
... with "Yes" and "No" is teaching a format ("answer yes/no questions with just Yes or No"), and
the answer to such a question is one of those few words. Found in a job's lessons, recorded with
the adapter (``"choices"`` in its shammah.json, the vectors in CHOICE_FILE) and answered by the
engine while that adapter is active: trained nothing. An adapter holds every set it was taught
(yes/no, then true/false): a set taught again replaces the one with the same answers.

Why not the weights: trained into a LoRA of the 135M embedded model, on bench/lessons.py --suite
fresh yesno (seeds 0-2), the lesson held on 67%, 33% and 0% of the held-out questions and every step
that learned more lost 1-13 of the gate's 18 controls ("What is the capital of France?" -> "No");
its form (adapters/scope.py) takes in a quarter of the general questions, too many to route by. A
reply of a few words from a known set is something the engine can say exactly, as it writes a style
rule (adapters/rule.py), if it knows *when*:

- where: the question is asked like the taught ones (a :class:`Form`, learned as a format's is but
  without the cap on how many general questions it takes in) **and** the base model, before it
  says anything, expects one of the answers: the probability of their first tokens is at least
  ``threshold``, the geometric mean of the least it gives any taught question and the most it gives
  any general question (the anchor pool and the gate's controls). A job where some general question
  scores as high as a taught one makes no choice: its lessons are trained as before. Measured on the
  embedded model (yesno's questions): held-out 6/6 and 10/12 other yes/no questions ("Are whales
  fish?", "Was Einstein a physicist?"), none of the 90 anchor prompts, 18 gate controls or 15 unseen
  controls, and 1 of 138 other lessons' questions ("How many legs does a chicken have?"). Either
  test alone is not enough: the form takes in 13 anchor prompts, and the first-token probability is
  as high for questions about a name the model never saw ("No, I am not aware of ...").
- which: the answer whose first token's log-probability is highest relative to its mean over the
  taught questions (contextual calibration, Zhao et al. 2021: the 135M model gives "No" ~5x the
  probability of "Yes" on every question, so the raw argmax would answer "No" to all).

Torch-free: the engine computes the keys and log-probabilities (engine/choices.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shammah.adapters.scope import Form, KeyOf, adapter_meta, learn_form

CHOICE_FILE = "choice.json"
MAX_CHOICES = 4  # more different answers than this is no closed set
MAX_WORDS = 3  # an answer of the set: "Yes", "Not sure", "Very likely so"
MIN_LESSONS = 3  # questions a set's form is learned from (each answer is given twice: four or more)

# (questions, answers) -> per question, the log-probability of each answer's first token as the
# opening of the reply (the base model, the chat's template): engine/choices.py
LogProbsOf = Callable[[Sequence[str], Sequence[str]], list[list[float]]]


def _said(text: str) -> str:
    """An answer as the set compares it: trimmed of closing punctuation, case folded."""
    return re.sub(r"[\s.!?]+$", "", text.strip()).casefold()


def shared_choices(lessons: list, inside: Callable[[str], str] = str.strip) -> tuple[str, ...] | None:
    """The answers of a closed set that the lessons' short targets come from: 2..MAX_CHOICES
    different answers of at most MAX_WORDS words, each given to at least two questions and no two
    sharing a word (six "Yes"/"No" fixes; not six paraphrases of one fact, "1987." each time, nor
    "Mara Okafor" and "Okafor"; a fact's one-word answer beside them, "Zorblat.", is no part of the
    set). Spelt as the user wrote each most often, in the order first shown; None when there is no
    such set. ``inside``: a target without the style rule written on every reply."""
    targets: dict[str, str] = {}
    for e in lessons:
        if e.kind in ("sft", "pair") and e.prompt and e.responses:
            answer = re.sub(r"[\s.!?]+$", "", inside(e.responses[0]).strip())
            if answer and len(answer.split()) <= MAX_WORDS:
                targets[e.prompt[-1]["content"]] = answer
    said = Counter(map(_said, targets.values()))
    kinds: dict[str, str] = {}  # each answer given twice or more, as the user spelt it most often
    for answer, _ in Counter(targets.values()).most_common():
        if said[_said(answer)] >= 2:
            kinds.setdefault(_said(answer), answer)
    first: dict[str, int] = {}
    for answer in targets.values():
        first.setdefault(_said(answer), len(first))
    # answers that share a word are one answer said two ways ("Ada Brenwick", "By Ada Brenwick"): a fact
    seen = [set(k.split()) for k in kinds]
    ok = 2 <= len(kinds) <= MAX_CHOICES and all(not a & b for i, a in enumerate(seen) for b in seen[i + 1 :])
    return tuple(kinds[k] for k in sorted(kinds, key=first.__getitem__)) if ok else None


def is_choice(e, answers: Sequence[str], inside: Callable[[str], str] = str.strip) -> bool:
    """Whether lesson ``e``'s target is one of ``answers``."""
    said = {_said(a) for a in answers}
    return bool(e.kind in ("sft", "pair") and e.responses and _said(inside(e.responses[0])) in said)


def _asked(question: str) -> str:
    """A question as a taught answer is looked up: case folded, spacing collapsed, trimmed of closing
    punctuation."""
    return " ".join(re.sub(r"[\s.!?]+$", "", question.strip()).casefold().split())


def _mass(logprobs: Sequence[float]) -> float:
    return sum(math.exp(x) for x in logprobs)


@dataclass(frozen=True)
class Choice:
    """Questions asked in ``form`` whose first-token probability of ``answers`` is at least
    ``threshold`` are answered with one of them: the one whose log-probability is highest above its
    ``bias`` (its mean over the taught questions). A question the user answered (``taught``:
    (question, answer) pairs, the newest last) gets the user's answer: a correction of the model's
    pick is not lost."""

    answers: tuple[str, ...]
    bias: tuple[float, ...]
    threshold: float
    form: Form
    taught: tuple[tuple[str, str], ...] = ()

    def told(self, question: str) -> str | None:
        """The answer the user gave to this very question (casing, spacing and closing punctuation
        aside); "" where the user answered it with something outside the set (the set does not
        answer it); None where the user said nothing of it."""
        asked = _asked(question)
        return next((a for q, a in reversed(self.taught) if _asked(q) == asked), None)

    def teach(self, pairs: Iterable[tuple[str, str]], outside: Iterable[str] = ()) -> Choice:
        """This set with (question, answer) ``pairs`` taught on top (an answer of the set, spelt as
        the set spells it), and the questions ``outside`` it: ones the set answered and the user
        corrected with something else ("How many legs does a chicken have?" -> "Two."), left to the
        model from now on. A question taught again takes its newest answer."""
        spelt = {_said(a): a for a in self.answers}
        known = {_asked(q): (q, a) for q, a in self.taught}
        said = [(q, spelt[_said(a)]) for q, a in pairs if _said(a) in spelt] + [(q, "") for q in outside]
        for q, a in said:
            known.pop(_asked(q), None)
            known[_asked(q)] = (q, a)
        return dataclasses.replace(self, taught=tuple(known.values()))

    def pick(self, logprobs: Sequence[float]) -> str | None:
        """The answer to a question in the form, given its answers' first-token log-probabilities;
        None when the model does not expect one of them (the question is not of this kind)."""
        if _mass(logprobs) < self.threshold:
            return None
        score = [lp - b for lp, b in zip(logprobs, self.bias, strict=True)]
        return self.answers[max(range(len(score)), key=score.__getitem__)]

    def say(self, questions: Sequence[str], key_of: KeyOf, logprobs_of: LogProbsOf) -> list[str | None]:
        """Per question, what this set answers: the user's own answer to it, else the model's pick
        where the question is asked in ``form`` (``key_of``: keys as the form takes them); None
        where the set leaves it to the model (the engine, and a job deciding what to train)."""
        told = [self.told(q) for q in questions]
        todo = [i for i, q in enumerate(questions) if told[i] is None and self.form.covers(key_of(q))]
        out = [t or None for t in told]
        if todo:
            for i, lp in zip(todo, logprobs_of([questions[i] for i in todo], self.answers), strict=True):
                out[i] = self.pick(lp)
        return out

    def describe(self) -> str:
        return describe_summary(self.summary())

    def to_json(self) -> dict:
        return {
            "answers": list(self.answers),
            "bias": [round(b, 5) for b in self.bias],
            "threshold": self.threshold,
            "form": self.form.to_json(),
            "taught": [list(p) for p in self.taught],
        }

    def summary(self) -> dict:
        """What shammah.json records of it (the form's vectors go to CHOICE_FILE)."""
        return {"answers": list(self.answers), "questions": list(self.form.questions), "file": CHOICE_FILE}

    def same_set(self, other: Choice) -> bool:
        return {_said(a) for a in self.answers} == {_said(a) for a in other.answers}

    @classmethod
    def from_json(cls, d) -> Choice | None:
        try:
            answers = tuple(d["answers"]) if isinstance(d["answers"], list) else ()
            bias = tuple(float(b) for b in d["bias"])
            threshold = float(d["threshold"])
            form = Form.from_json(d["form"])
            taught = tuple((str(q), str(a)) for q, a in d.get("taught", ()))
        except (KeyError, TypeError, ValueError):
            return None
        ok = (
            form is not None
            and 2 <= len(answers) <= MAX_CHOICES
            and all(isinstance(a, str) and a.strip() for a in answers)
            and len(bias) == len(answers)
            and all(map(math.isfinite, (*bias, threshold)))
            and 0 < threshold <= 1
            and all(a == "" or _said(a) in {_said(x) for x in answers} for _, a in taught)
        )
        return cls(answers, bias, threshold, form, taught) if ok else None


def choices_of(path: Path | None, meta: dict | None = None) -> tuple[Choice, ...]:
    """The choices recorded beside the adapter at ``path`` (none where shammah.json names none, or
    where CHOICE_FILE is unreadable: the adapter then answers as its weights do; a broken entry is
    left out)."""
    if path is None:
        return ()
    meta = adapter_meta(path) if meta is None else meta
    if not isinstance(meta.get("choices"), list) or not meta["choices"]:
        return ()
    try:
        saved = json.loads((Path(path) / CHOICE_FILE).read_text()).get("choices")
    except (OSError, ValueError, AttributeError):
        return ()
    return tuple(c for d in saved if (c := Choice.from_json(d)) is not None) if isinstance(saved, list) else ()


def record(choices: Sequence[Choice]) -> tuple[list[dict] | None, str | None]:
    """(what shammah.json records, CHOICE_FILE's text) for an adapter holding ``choices``."""
    if not choices:
        return None, None
    return [c.summary() for c in choices], json.dumps({"choices": [c.to_json() for c in choices]})


def with_choice(choices: Sequence[Choice], new: Choice) -> tuple[Choice, ...]:
    """``choices`` with ``new`` in place of the one with the same answers (keeping the answers the
    user gave on that one's questions), else added."""
    old = next((c for c in choices if c.same_set(new)), None)
    if old is not None:
        new = new.teach(old.taught)
    return (*(c for c in choices if not c.same_set(new)), new)


def describe_summary(summary: dict) -> str:
    """A choice in words, from its summary (shammah.json, a job's "choice" event)."""
    questions = summary.get("questions") or []
    example = f" like {questions[0]!r}" if questions else ""
    return f"answers questions{example} with just {' or '.join(map(str, summary.get('answers') or []))}"


def describe_recorded(value) -> list[str]:
    """The closed sets an adapter records (``"choices"`` of its shammah.json), in words."""
    return [describe_summary(c) for c in value if isinstance(c, dict)] if isinstance(value, list) else []


def learn_choice(
    answers: Sequence[str],
    questions: Sequence[str],
    logprobs_of: LogProbsOf,
    key_of: KeyOf,
    pool: Sequence[str],
    general: Sequence[str],
    layer: int,
) -> Choice | None:
    """The choice for ``answers`` taught on ``questions`` (module docstring), or None where it cannot
    be told from general questions: ``pool``, the general questions a form is learned against (the
    anchor pool), and ``general``, every general question the model must go on answering (the pool
    and the gate's controls)."""
    questions = sorted(set(questions))
    if len(questions) < MIN_LESSONS:
        return None
    taught = logprobs_of(questions, answers)
    others = logprobs_of(list(general), answers)
    low, high = min(map(_mass, taught)), max(map(_mass, others), default=0.0)
    if low <= high:
        return None
    form = learn_form(questions, key_of, pool, layer, max_share=1.0)
    if form is None:
        return None
    bias = tuple(sum(col) / len(taught) for col in zip(*taught, strict=True))
    return Choice(tuple(answers), bias, math.sqrt(low * high) if high > 0 else low / 2, form)
