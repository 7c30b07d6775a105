"""Note-guided rewrites: the prompt that asks for one, and the rule that decides whether a rewrite
nobody has seen may be trusted (``learning.revision_noninteractive = "check"``).

A small model's rewrite can keep the fact of the note and invent the rest, or drop the fact. The
check is deliberately literal: every quoted phrase, number and capitalised name the note adds
(not already in the question) must appear in the rewrite, and a quoted form ("Photosynthesis:
...", "Answer: <number>") must be the shape of one of its lines. A note with nothing checkable
(e.g. "too long") never passes: what the model made of it cannot be verified without a person.
"""

from __future__ import annotations

import re

_QUOTED = re.compile(r"[\"'“‘`]([^\"'”’`]{2,})[\"'”’`]")
# A quote that shows a form rather than words to write ("Photosynthesis: ...", "Answer: <number>").
_TEMPLATE = re.compile(r"\.\.\.|…|<[^<>]+>")
# A form's pieces: a run of words, a space, one punctuation mark.
_PIECE = re.compile(r"\w+(?:\s+\w+)*|\s+|[^\w\s]")
_TOKEN = re.compile(r"\b(?:\d[\d.,:/-]*\d|\d|[A-Z][\w-]*[a-z0-9][\w-]*)\b")
# What comes before a word that opens a sentence (its capital says nothing).
_OPENS = re.compile(r"(?:^|[.!?]\s|\n)\W*$")
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


def is_template(quote: str) -> bool:
    """Whether a quoted phrase shows a form ("Photosynthesis: ...", "Answer: <number>") rather than
    words to write."""
    return _TEMPLATE.search(quote) is not None


def checkable_terms(note: str, question: str = "") -> list[str]:
    """What the note asserts that a rewrite must repeat: quoted phrases, numbers, names. A quoted
    form with a placeholder is an example of the shape, not words to repeat: it is not checked."""
    terms = [q.strip() for q in _QUOTED.findall(note) if re.search(r"\w", q) and not is_template(q)]
    rest = _QUOTED.sub(" ", note)
    terms += [w for w in _TOKEN.findall(rest) if w.lower() not in _COMMON]
    q = question.lower()
    return [t for t in dict.fromkeys(terms) if t.lower() not in q]


def opens_sentence(text: str, at: int) -> bool:
    """Whether the word at offset ``at`` of ``text`` opens a sentence (its capital says nothing)."""
    return _OPENS.search(text, 0, at) is not None


def names_and_numbers(text: str) -> list[str]:
    """The numbers and names ``text`` states: numbers, and capitalised words that do not open a
    sentence ("Our team lead is Sam." -> ["Sam"]; "Grass is green." -> [])."""
    return [m.group() for m in _TOKEN.finditer(text) if m.group()[0].isdigit() or not opens_sentence(text, m.start())]


# What opens a note that says the reply was wrong before saying what is right ("wrong: ...", "No, ...").
_VERDICT = re.compile(
    r"^\s*(?:(?:that(?:'s|’s| is| was)\s+)?(?:wrong|incorrect|not right|no|nope)\b[\s:,.;!—-]*)+", re.I
)


def stated_answer(note: str, question: str) -> str | None:
    """The note as an answer to ``question``, where it states one: after its verdict ("wrong: the
    Ombrel River flows into the Sea of Tarn"), a statement that repeats a name of the question
    ("Ombrel") and says something checkable the question does not (:func:`checkable_terms`:
    "Sea", "Tarn"). None for a note about how to answer ('always address me as "Captain"', "use
    digits"), which names nothing of the question."""
    statement = _VERDICT.sub("", note).strip()
    named = [n.lower() for n in names_and_numbers(question)]
    if not statement or not named or not checkable_terms(statement, question):
        return None
    if not any(n in statement.lower() for n in named):
        return None
    statement = statement[0].upper() + statement[1:]
    return statement if statement[-1] in ".!?" else statement + "."


def form_shape(quote: str) -> re.Pattern | None:
    """The shape a quoted form asks of an answer's line, from what comes before its placeholder: its
    words stand for any one to four words (the term of "Photosynthesis: ..." is the question's own),
    its punctuation is kept, Markdown emphasis is allowed ("**Volcano**: ..."). None where the form
    has no placeholder, or nothing but words before it: a shape of words alone says nothing."""
    m = _TEMPLATE.search(quote)
    prefix = quote[: m.start()].strip() if m else ""
    if not re.search(r"[^\w\s]", prefix):
        return None
    word = r"\**\w[\w'’-]*(?:\s+\w[\w'’-]*){0,3}\**"
    parts = (word if re.match(r"\w", p) else r"\s*" if p.isspace() else re.escape(p) for p in _PIECE.findall(prefix))
    return re.compile(r"^[\s*#>_-]*" + "".join(parts), re.M)


def _shapes(note: str) -> list[tuple[str, re.Pattern]]:
    """The quoted forms of ``note`` whose shape can be checked, each with its shape (:func:`form_shape`)."""
    return [(q.strip(), s) for q in _QUOTED.findall(note) if (s := form_shape(q)) is not None]


def unsaid(note: str, question: str, answer: str) -> list[str]:
    """What ``answer`` leaves out of what the note asserts: the quoted phrases, numbers and names it
    does not say, the quoted forms none of its lines has the shape of."""
    text = answer.lower()
    missing = [t for t in checkable_terms(note, question) if t.lower() not in text]
    return missing + [q for q, shape in _shapes(note) if not shape.search(answer)]


def states_the_note(note: str, question: str, rewrite: str) -> bool:
    return bool(checkable_terms(note, question) or _shapes(note)) and not unsaid(note, question, rewrite)


def did_not(missing: list[str]) -> str:
    """'did not write "Captain"', 'did not answer like "Term: ..."': what a message says of the
    words and forms (:func:`unsaid`) an answer left out, the first three of each."""
    forms = [m for m in missing if form_shape(m) is not None]
    words = [m for m in missing if m not in forms]
    parts = [
        f"{verb} " + " or ".join(f'"{m}"' for m in ms[:3])
        for verb, ms in (("write", words), ("answer like", forms))
        if ms
    ]
    return "did not " + " or ".join(parts)
