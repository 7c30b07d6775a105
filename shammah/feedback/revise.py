"""Note-guided rewrites: the prompt that asks for one, and the rule that decides whether a rewrite
nobody has seen may be trusted (``learning.revision_noninteractive = "check"``).

A small model's rewrite can keep the fact of the note and invent the rest, or drop the fact. The
check is deliberately literal: every quoted phrase, number and capitalised name the note adds
(not already in the question) must appear in the rewrite. A note with nothing checkable (e.g.
"too long") never passes: what the model made of it cannot be verified without a person.
"""

from __future__ import annotations

import re

_QUOTED = re.compile(r"[\"'“‘`]([^\"'”’`]{2,})[\"'”’`]")
# A quote that shows a form rather than words to write ("Photosynthesis: ...", "Answer: <number>").
_TEMPLATE = re.compile(r"\.\.\.|…|<[^<>]+>")
_TOKEN = re.compile(r"\b(?:\d[\d.,:/-]*\d|\d|[A-Z][\w-]*[a-z0-9][\w-]*)\b")
# Words that start a note's sentences without being what it asserts.
_COMMON = set(
    "a an the i it its it's that this these there they we you your no not wrong answer yes please always never "
    "use give say write don't do be keep make start end put reply in on at for and or but also just only".split()
)


def revision_request(note: str) -> str:
    return (
        f"That answer was wrong: {note}\nWrite the corrected answer to my previous message. "
        "Reply with the corrected answer only."
    )


def revision_messages(context: list[dict], reply: str, note: str) -> list[dict]:
    """What the model is asked for a rewrite: the conversation as it was, its reply, the request."""
    return context + [{"role": "assistant", "content": reply}, {"role": "user", "content": revision_request(note)}]


def trust_unseen(policy: str, note: str, question: str, rewrite: str) -> bool:
    """May a rewrite nobody saw be trained on? ``policy`` is learning.revision_noninteractive:
    accept | reject | check (only a rewrite that states what the note states)."""
    return policy == "accept" or (policy == "check" and states_the_note(note, question, rewrite))


def checkable_terms(note: str, question: str = "") -> list[str]:
    """What the note asserts that a rewrite must repeat: quoted phrases, numbers, names. A quoted
    form with a placeholder is an example of the shape, not words to repeat: it is not checked."""
    terms = [q.strip() for q in _QUOTED.findall(note) if re.search(r"\w", q) and not _TEMPLATE.search(q)]
    rest = _QUOTED.sub(" ", note)
    terms += [w for w in _TOKEN.findall(rest) if w.lower() not in _COMMON]
    q = question.lower()
    return [t for t in dict.fromkeys(terms) if t.lower() not in q]


def states_the_note(note: str, question: str, rewrite: str) -> bool:
    terms = checkable_terms(note, question)
    text = rewrite.lower()
    return bool(terms) and all(t.lower() in text for t in terms)


def any_of(terms: list[str]) -> str:
    """'"a" or "b" or "c"': the first three of ``terms``, as a message names what was not said."""
    return " or ".join(f'"{t}"' for t in terms[:3])
