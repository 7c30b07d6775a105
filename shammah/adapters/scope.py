"""Where a learned adapter answers: the subjects its lessons were about.

Taught a fact about a subject the model never saw ("Who is the CEO of Pellucid Labs?" → "Mara
Okafor."), a LoRA learns it as "a who-question is answered with this name": "Who wrote Hamlet?"
answers "Mara Okafor." from the same training step on which the lesson is learned, whatever the
anchors, the loss or the layers (README, "Learning curves"; Gekhman et al. 2024 measured the same
in large models). Model editing keeps such edits local by *routing*: GRACE (Hartvigsen et al.
2023) and MELO (Yu et al. 2024) key each edit on its input and apply it only to inputs near the
key; WISE (Wang et al. 2024) routes between an edited side memory and the untouched weights.

shammah keys on words, so the rule can be said in one line and shown in ``/status``: a lesson
whose questions share a *rare* word — one the model's tokenizer has no single token for, the
mark of a name it was never taught: "Quenland", "Pellucid", "glimmerphone" — is about that
subject, and the adapter answers a question only when it names one of its subjects; the base
model answers the rest, exactly as before the lesson. A style or a format ("start every answer
with Ahoy!", "lists as JSON") is taught on unrelated questions that share no such word, so an
adapter holding any such lesson answers everywhere. Torch-free: the chat and the worker use it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
MIN_QUESTIONS = 2  # a subject is a rare word in at least this many of the taught questions


def words(text: str) -> set[str]:
    """The words of ``text``, lower-cased, possessives cut ("Quenland's" → "quenland")."""
    out = set()
    for w in _WORD.findall(text):
        w = re.sub(r"['’]s$", "", w.lower())
        if len(w) >= 3 and not w.isdigit():
            out.add(w)
    return out


def tokenizer_rarity(tok) -> Callable[[str], bool]:
    """A word is rare if the tokenizer splits it, in every casing (words() lower-cases; "ceo" is
    " CEO"), into more than one piece after a space: common words are single tokens in a
    byte-level BPE of 49k–152k entries, names the model never saw are not. Measured on the
    embedded model's tokenizer: of the lesson suite's and the controls' words only the made-up
    names and "Sistine" are rare (tests/test_lessons.py)."""
    base = len(tok.encode("a", add_special_tokens=False))

    def rare(word: str) -> bool:
        return all(
            len(tok.encode("a " + v, add_special_tokens=False)) - base > 1
            for v in {word, word.lower(), word.capitalize(), word.upper()}
        )

    return rare


@dataclass(frozen=True)
class Scope:
    """``subjects`` the adapter answers about; ``None``: everywhere."""

    subjects: frozenset[str] | None = None

    @property
    def everywhere(self) -> bool:
        return self.subjects is None

    def covers(self, text: str) -> bool:
        return self.subjects is None or bool(words(text) & self.subjects)

    def describe(self) -> str:
        if self.subjects is None:
            return "answers every question"
        return "answers questions that name " + ", ".join(sorted(self.subjects)) + "; the base model answers the rest"

    def to_json(self) -> dict:
        return {"subjects": None if self.subjects is None else sorted(self.subjects)}

    @classmethod
    def from_json(cls, d) -> Scope:
        subjects = d.get("subjects") if isinstance(d, dict) else None
        if not isinstance(subjects, list) or not subjects or not all(isinstance(s, str) for s in subjects):
            return cls()
        return cls(frozenset(s.lower() for s in subjects))

    @classmethod
    def of_adapter(cls, path: Path | None) -> Scope:
        """The scope recorded in an adapter's ``shammah.json``; everywhere when there is none (an
        adapter from ``shammah train``, a package, or one trained before scopes)."""
        if path is None:
            return cls()
        try:
            meta = json.loads((Path(path) / "shammah.json").read_text())
        except (OSError, ValueError):
            return cls()
        return cls.from_json(meta.get("scope")) if isinstance(meta, dict) else cls()


def learn(questions: Iterable[str], rare: Callable[[str], bool]) -> Scope:
    """The scope of an adapter trained on lessons asked as ``questions`` (every lesson it holds,
    replayed ones included): local only if every question names a subject — a rare word that at
    least MIN_QUESTIONS of the questions share."""
    qs = {q.strip() for q in questions if q and q.strip()}
    if not qs:
        return Scope()
    rare_words = {q: {w for w in words(q) if rare(w)} for q in qs}
    counts = Counter(w for ws in rare_words.values() for w in ws)
    subjects = {w for w, n in counts.items() if n >= MIN_QUESTIONS}
    if not subjects or any(not (ws & subjects) for ws in rare_words.values()):
        return Scope()
    return Scope(frozenset(subjects))
