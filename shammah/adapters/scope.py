"""Where a learned adapter answers: the subjects its lessons were about, or the form they were
asked in.

Taught a fact about a subject the model never saw ("Who is the CEO of Pellucid Labs?" → "Mara
Okafor."), a LoRA learns it as "a who-question is answered with this name": "Who wrote Hamlet?"
answers "Mara Okafor." from the same training step on which the lesson is learned, whatever the
anchors, the loss or the layers (README, "Learning curves"; Gekhman et al. 2024 measured the same
in large models). Model editing keeps such edits local by *routing*: GRACE (Hartvigsen et al.
2023) and MELO (Yu et al. 2024) key each edit on its input and apply it only to inputs near the
key; WISE (Wang et al. 2024) routes between an edited side memory and the untouched weights.

shammah keys a fact on words, so the rule can be said in one line and shown in ``/status``: a lesson
whose questions share a *rare* word — one the model's tokenizer has no single token for, the
mark of a name it was never taught: "Quenland", "Pellucid", "glimmerphone" — is about that
subject, and the adapter answers a question only when it names one of its subjects; the base model
answers the rest, exactly as before the lesson. A name spelt in common words ("Who wrote The Salt
Clock?") has no rare word, but the user writes it in capitals: a run of capitalised words that does
not open the question, shared by the questions and named in none of the general ones
(:func:`names`), is a subject too. Torch-free: the chat and the worker use it.

A format ("lists as JSON", "Answer: <number>", dates as YYYY-MM-DD) is taught on questions of one
*form* ("Name three fruits.", "List three colors.") and shares no rare word. Such a lesson is keyed
on the questions themselves, as GRACE and MELO key an edit: each taught question's key is the base
model's mean hidden state over its tokens (at a third of the depth, centred on a pool of general
questions); a new question is in scope when its key is at least as close to a taught one as the
taught questions are to each other (the smallest leave-one-out nearest-neighbour similarity, less a
margin) and nearer to a taught question than to any general question outside that radius. A style
rule taught on unrelated questions gives a radius that takes in most of the pool: it answers
everywhere. Keys need the model; this module only compares them (``key_of``).
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

from shammah.feedback.revise import opens_sentence

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
MIN_QUESTIONS = 2  # a subject is a rare word in at least this many of the taught questions
FORM_SLACK = 0.9  # a form's radius: this share of its questions' smallest nearest-neighbour similarity
# A form that takes in more than this share of the pool of general questions is no form: the lesson
# answers everywhere. Measured on the embedded model (bench/lessons.py questions, key layer 10): the
# four formats take in 2-16% of the anchor pool, the four style rules 39-65%.
MAX_POOL_SHARE = 0.25

KeyOf = Callable[[str], Sequence[float]]
SCOPE_FILE = "scope.json"  # a form's vectors, beside the adapter (shammah.json keeps a summary)


def words(text: str) -> set[str]:
    """The words of ``text``, lower-cased, possessives cut ("Quenland's" → "quenland")."""
    out = set()
    for w in _WORD.findall(text):
        w = re.sub(r"['’]s$", "", w.lower())
        if len(w) >= 3 and not w.isdigit():
            out.add(w)
    return out


# A run of capitalised words ("The Salt Clock", "Marrowby Bridge", "World War II"), and what may open
# one without being part of the name.
_NAME = re.compile(r"[A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*)*")
_ARTICLES = ("the", "a", "an")


def names(text: str) -> set[str]:
    """The names ``text`` writes in capitals, lower-cased: each run of capitalised words, less a
    leading article and a possessive, where it does not open a sentence ("Who wrote The Salt Clock?"
    -> {"salt clock"}; "The Salt Clock is a novel by whom?" -> {"salt clock"}: a run that opens the
    question keeps its words after the first). A one-word name shorter than three letters is none
    ("I")."""
    out = set()
    for m in _NAME.finditer(text):
        parts = m.group().split()
        if opens_sentence(text, m.start()):
            parts = parts[1:]
        run: list[str] = []
        for w in [*parts, ""]:  # a possessive ends a name ("Pellucid Labs' CEO": "pellucid labs", "ceo")
            cut = re.sub(r"['’]s?$", "", w)
            if w and (run or cut.lower() not in _ARTICLES):
                run.append(cut.lower())
            if (cut != w or not w) and run:
                if len(name := " ".join(run)) >= 3:
                    out.add(name)
                run = []
    return out


def mentions(text: str, subject: str) -> bool:
    """Whether ``text`` names ``subject``: a word of it (:func:`words`), or a name of several words
    written out in any casing ("who wrote the salt clock" names "salt clock")."""
    if " " not in subject:
        return subject in words(text)
    parts = r"\s+".join(map(re.escape, subject.split()))
    return re.search(rf"(?<![\w'’-]){parts}(?![\w-])", text, re.I) is not None


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


def _unit(v: Sequence[float], center: Sequence[float]) -> list[float]:
    d = [a - b for a, b in zip(v, center, strict=True)]
    n = math.sqrt(sum(x * x for x in d)) or 1.0
    return [x / n for x in d]


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Form:
    """Questions asked like the taught ones. ``keys``: unit vectors (centred on ``center``) of the
    taught ``questions`` at hidden-state ``layer``; ``negatives``: those of the general questions
    outside the radius. A question is in scope when its similarity to a taught key is at least
    ``radius`` and at least its similarity to every negative (its nearest known question is a
    taught one): "Who wrote Romeo and Juliet?" is near enough to "When did World War II end?" by
    the radius alone, and nearer to "Who wrote Pride and Prejudice?"."""

    layer: int
    center: tuple[float, ...]
    keys: tuple[tuple[float, ...], ...]
    radius: float
    questions: tuple[str, ...] = ()
    negatives: tuple[tuple[float, ...], ...] = ()
    tokens: int = 0  # the keys average a question's first ``tokens`` tokens (0: all; engine/keys.py)

    def similarity(self, key: Sequence[float]) -> float:
        u = _unit(key, self.center)
        return max(_dot(u, k) for k in self.keys)

    def covers(self, key: Sequence[float]) -> bool:
        u = _unit(key, self.center)
        near = max(_dot(u, k) for k in self.keys)
        return near >= self.radius and all(near >= _dot(u, n) for n in self.negatives)

    def to_json(self) -> dict:
        def r(v):
            return [round(x, 4) for x in v]

        return {
            "layer": self.layer,
            "radius": round(self.radius, 5),
            "questions": list(self.questions),
            "center": r(self.center),
            "keys": [r(k) for k in self.keys],
            "negatives": [r(k) for k in self.negatives],
            "tokens": self.tokens,
        }

    @classmethod
    def from_json(cls, d) -> Form | None:
        try:
            center = tuple(float(x) for x in d["center"])
            keys = tuple(tuple(float(x) for x in k) for k in d["keys"])
            negatives = tuple(tuple(float(x) for x in k) for k in d.get("negatives", ()))
            questions = tuple(map(str, d.get("questions", ())))
            tokens = d.get("tokens", 0)  # a form learned before keys took the first tokens: all of them
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
                return None
            form = cls(int(d["layer"]), center, keys, float(d["radius"]), questions, negatives, tokens)
        except (KeyError, TypeError, ValueError):
            return None
        vectors = keys + negatives
        ok = keys and all(len(k) == len(center) for k in vectors) and all(map(math.isfinite, center + sum(vectors, ())))
        return form if ok and form.layer >= 0 else None


def describe(subjects, form: tuple[int, Sequence[str]] | None) -> str:
    """Where a scope answers, in words: ``subjects`` and a form of (questions taught, an example or
    none). Also for a scope known only by its summary (a package's manifest)."""
    parts = []
    if subjects:
        parts.append("questions that name " + ", ".join(sorted(subjects)))
    if form is not None:
        example = f" (e.g. {form[1][0]!r})" if form[1] else ""
        parts.append(f"questions asked like the {form[0]} it was taught{example}")
    return "answers " + " or ".join(parts) + "; the base model answers the rest" if parts else "answers every question"


def describe_summary(summary: dict | None) -> str:
    """:func:`describe` for a scope known by its summary (an adapter's shammah.json, a package's
    manifest)."""
    form = (summary or {}).get("form")
    questions = (form.get("questions") or []) if form else []
    return describe((summary or {}).get("subjects"), (len(questions), questions[:1]) if form else None)


def adapter_meta(path: Path | None) -> dict:
    """An adapter's ``shammah.json`` as a dict ({} when it is missing or unreadable, and for the
    base model: ``path`` None): what the engine routes by (its scope) and writes on every reply
    (its rule), read once per switch."""
    if path is None:
        return {}
    try:
        meta = json.loads((Path(path) / "shammah.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


@dataclass(frozen=True)
class Scope:
    """Where an adapter answers: questions that name one of ``subjects`` or are asked in ``form``;
    neither: everywhere."""

    subjects: frozenset[str] | None = None
    form: Form | None = None

    @property
    def everywhere(self) -> bool:
        return self.subjects is None and self.form is None

    def covers(self, text: str, key_of: KeyOf | None = None) -> bool:
        """``key_of(text)``: the question's key at ``form.layer`` (asked only when a form decides;
        without it a form covers nothing)."""
        if self.everywhere or (self.subjects and any(mentions(text, s) for s in self.subjects)):
            return True
        return self.form is not None and key_of is not None and self.form.covers(key_of(text))

    def describe(self) -> str:
        f = self.form
        return describe(self.subjects, None if f is None else (len(f.keys), f.questions[:1]))

    def to_json(self) -> dict:
        out: dict = {"subjects": None if self.subjects is None else sorted(self.subjects)}
        if self.form is not None:
            out["form"] = self.form.to_json()
        return out

    def summary(self) -> dict:
        """What shammah.json records: the subjects, and a form's layer, radius and questions (its
        vectors, ~100 of the model's width, go to SCOPE_FILE: /adapters list reads every
        shammah.json)."""
        out = self.to_json()
        if "form" in out:
            out["form"] = {k: out["form"][k] for k in ("layer", "radius", "questions")} | {"file": SCOPE_FILE}
        return out

    @classmethod
    def from_json(cls, d) -> Scope:
        if not isinstance(d, dict):
            return cls()
        subjects = d.get("subjects")
        ok = isinstance(subjects, list) and subjects and all(isinstance(s, str) for s in subjects)
        form = Form.from_json(d["form"]) if isinstance(d.get("form"), dict) else None
        return cls(frozenset(s.lower() for s in subjects) if ok else None, form)

    @classmethod
    def of_adapter(cls, path: Path | None, meta: dict | None = None) -> Scope:
        """The scope recorded in an adapter's ``shammah.json`` (``meta``, when already read; a
        form's vectors in SCOPE_FILE); everywhere when there is none (an adapter from ``shammah
        train``, a package, or one trained before scopes)."""
        if path is None:
            return cls()
        meta = adapter_meta(path) if meta is None else meta
        scope = meta.get("scope")
        if isinstance(scope, dict) and isinstance(scope.get("form"), dict) and "file" in scope["form"]:
            try:  # the form's vectors; a missing or broken file leaves the subjects alone
                scope = {**scope, "form": json.loads((Path(path) / SCOPE_FILE).read_text()).get("form")}
            except (OSError, ValueError, AttributeError):
                scope = {**scope, "form": None}
        return cls.from_json(scope)


def learn_form(
    questions: list[str], key_of: KeyOf, pool: Sequence[str], layer: int, max_share: float = MAX_POOL_SHARE
) -> Form | None:
    """A form for ``questions`` (keys by ``key_of``, at ``layer``; over a question's first
    ``key_of.tokens`` tokens where it says, else all), or None when they are too few or too far
    apart to be one: the radius would take in more than ``max_share`` of the general questions
    ``pool`` (a choice, adapters/choice.py, narrows its form by what the model expects instead)."""
    tokens = getattr(key_of, "tokens", 0)
    if len(questions) < MIN_QUESTIONS or not pool:
        return None
    pool_keys = [list(key_of(p)) for p in pool]
    center = [sum(col) / len(pool_keys) for col in zip(*pool_keys, strict=True)]
    keys = [_unit(key_of(q), center) for q in questions]
    nearest = [max(_dot(k, o) for j, o in enumerate(keys) if j != i) for i, k in enumerate(keys)]
    radius = min(nearest)
    radius = radius * FORM_SLACK if radius > 0 else radius
    form = Form(layer, tuple(center), tuple(map(tuple, keys)), radius, tuple(questions), tokens=tokens)
    inside = [form.similarity(k) >= radius for k in pool_keys]
    if sum(inside) > max_share * len(pool_keys):
        return None
    negatives = tuple(tuple(_unit(k, center)) for k, i in zip(pool_keys, inside, strict=True) if not i)
    return dataclasses.replace(form, negatives=negatives)


def learn(
    questions: Iterable[str],
    rare: Callable[[str], bool],
    key_of: KeyOf | None = None,
    pool: Sequence[str] = (),
    layer: int = 0,
) -> Scope:
    """The scope of an adapter trained on lessons asked as ``questions`` (every lesson it holds,
    replayed ones included). A question that names a subject — a rare word that at least
    MIN_QUESTIONS of the questions share or, for the questions none of those covers, a name in
    capitals (:func:`names`) that as many share and no question of ``pool`` names — is covered by
    it; the others, when there are any, must make a form (:func:`learn_form`, given ``key_of`` and a
    ``pool`` of general questions), else the adapter answers everywhere. (A name the general
    questions use, "CEO" or "Tesla", says nothing about which questions a lesson is about.)"""
    qs = sorted({q.strip() for q in questions if q and q.strip()})
    if not qs:
        return Scope()
    rare_words = {q: {w for w in words(q) if rare(w)} for q in qs}
    counts = Counter(w for ws in rare_words.values() for w in ws)
    subjects = {w for w, n in counts.items() if n >= MIN_QUESTIONS}
    rest = [q for q in qs if not (rare_words[q] & subjects)]
    named = {q: names(q) for q in rest}
    counts = Counter(n for ns in named.values() for n in ns)
    shared = {n for n, c in counts.items() if c >= MIN_QUESTIONS and not any(mentions(p, n) for p in pool)}
    subjects |= shared
    rest = [q for q in rest if not (named[q] & shared)]
    form = None
    if rest:
        form = learn_form(rest, key_of, pool, layer) if key_of is not None else None
        if form is None:
            return Scope()
    return Scope(frozenset(subjects) if subjects else None, form)
