"""Marks: formats the engine writes on every reply, as it writes a style rule's opening — numbers
in digits ("A horse has 4 legs.") and the answer in bold ("The capital of Italy is **Rome**.").

Why text, not weights: a format meant for every answer, trained into a LoRA of the 135M embedded
model, was either not learned or leaked. bench/lessons.py --suite fresh, seeds 0-2: bold taught by
six fixes was 0% x3 on held-out questions and cost 2 unseen controls in one run; digits asked for
in a note alone was not learned at all (the model does not follow the note, so there is no answer
of its own to learn from). Written by the engine, a mark is on every answer by construction and
the model answers the content as it would without it.

A mark is learned the way a rule is (adapters/rule.py): shown on the user's corrections (each one
the reply it corrects with the mark put on: "seven" -> "7", the answer in ``**``), or asked for in
the notes of three note-only lessons ("use digits for numbers"). Written by hand, not taken from a
library: number words to digits is a dozen lines of regular expression (``word2number`` and
``text2num`` parse a number phrase, not a sentence), and the answer's span is whatever the reply
says that its question does not — a heuristic a tagger (spaCy) would only make heavier.

Torch-free: the chat, the server and the worker use it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator

DIGITS = "digits"
TERM = "term"
BOLD = "bold"
MARKS = (DIGITS, TERM, BOLD)  # the order they are written in
_DESCRIBE = {DIGITS: "numbers in digits", TERM: 'definitions as "Term: ..."', BOLD: "the answer in bold"}

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split()
)
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_VALUE = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_SMALL = r"(?:(?:" + "|".join(_TENS) + r")(?:[- ](?:" + "|".join(_UNITS[1:10]) + r"))?|" + "|".join(_UNITS) + ")"
# a number said in words, up to "nine hundred and ninety-nine"; "hundred" alone is left as it is
_NUMBER = re.compile(
    rf"\b(?P<a>{_SMALL})(?:\s+hundred(?:\s+(?:and\s+)?(?P<b>{_SMALL}))?)?\b(?!-)",
    re.I,
)
# "one" that is no number: "no one", "the one", "one of", "one another"
_NOT_ONE_BEFORE = re.compile(r"\b(?:no|every|any|some|the|this|that|which|each|such|a)\s+$", re.I)
_NOT_ONE_AFTER = re.compile(
    r"^\s+(?:of|another|who|which|that|is|was|can|could|should|would|must|may|might|will)\b", re.I
)


def _value(words: str) -> int:
    parts = re.split(r"[- ]", words.lower())
    return sum(_VALUE[p] for p in parts)


def digits(text: str) -> str:
    """``text`` with its numbers in words written in digits ("A tricycle has three wheels." -> "A
    tricycle has 3 wheels.", "twenty-one" -> "21", "two hundred and five" -> "205")."""

    def one(m: re.Match) -> str:
        a = m.group("a")
        if m.group(0).lower() == "one" and (
            _NOT_ONE_BEFORE.search(text[: m.start()]) or _NOT_ONE_AFTER.match(text[m.end() :])
        ):
            return m.group(0)
        if "hundred" in m.group(0).lower():
            return str(_value(a) * 100 + (_value(m.group("b")) if m.group("b") else 0))
        return str(_value(a))

    return _NUMBER.sub(one, text)


def has_number_words(text: str) -> bool:
    return digits(text) != text


_BOLD = re.compile(r"\*\*([^*\n]+)\*\*")
# Words that are no answer: what a question and its answer are built of ("is", "the", "known as").
_FUNCTION = frozenset(
    "a an the is are was were be been being am do does did done has have had having it its it's this that these those "
    "there their they them he she his her him we our you your i me my of in on at to for from with by as and or but "
    "not no yes so than then also very most more many much some any all each every one which who whom whose what "
    "when where why how if into onto about over under after before between called known named said can could will "
    "would should may might must shall just only well sure certainly great question answer because while".split()
)
_TOKEN = re.compile(r"[A-Za-z0-9][\w'’-]*")
_JOIN = frozenset("of the de da di du van von der la le".split())  # inside a name: "United States of America"


def _stem(w: str) -> str:
    w = re.sub(r"['’]s$", "", w.lower())
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def _asked(question: str) -> set[str]:
    """The words of ``question``, stemmed: what an answer's words are told apart from."""
    return {_stem(w) for w in _TOKEN.findall(question)}


def answer_span(sentence: str, question: str) -> tuple[int, int] | None:
    """Where ``sentence`` says what ``question`` asks: the first run of words (no punctuation
    between them) that are neither in the question nor function words — a name first, if there is
    one ("The capital of Italy is Rome." -> "Rome"; "The tallest animal is the giraffe." ->
    "giraffe"); None where every word was asked."""
    asked = _asked(question)
    spans: list[tuple[int, int, bool]] = []  # (start, end, a name)
    run: list[re.Match] = []

    def close() -> None:
        while run and run[-1].group().lower() in _JOIN:
            run.pop()
        if run:
            name = any(m.group()[0].isupper() and m.start() > 0 for m in run)
            spans.append((run[0].start(), run[-1].end(), name))
        run.clear()

    end = None
    for m in _TOKEN.finditer(sentence):
        w = m.group()
        if end is None or not sentence[end : m.start()].isspace():
            close()  # punctuation between: "Rome, which ..."
        if _stem(w) not in asked and w.lower() not in _FUNCTION:
            run.append(m)
        elif run and w.lower() in _JOIN and run[-1].group()[0].isupper():
            run.append(m)  # may go on as a name ("United States of America"); trimmed if it does not
        else:
            close()
        end = m.end()
    close()
    if not spans:
        return None
    start, stop, _ = next((s for s in spans if s[2]), spans[0])
    return start, stop


def bold(text: str, question: str) -> str:
    """``text`` with the answer of its first sentence in bold (:func:`answer_span`); as it is where
    the model already wrote bold, or where its first sentence only repeats the question."""
    if "**" in text:
        return text
    from shammah.adapters.rule import sentence_ends  # rule.py imports this module

    ends = sentence_ends(text)
    first = text[: ends[0]] if ends else text
    span = answer_span(first, question)
    if span is None:
        return text
    a, b = span
    return f"{text[:a]}**{text[a:b]}**{text[b:]}"


# A question that asks what something is: "What is a volcano?", "What are nouns?", "Define erosion.",
# "What does habitat mean?" — and not "What is the capital of China?" (a fact about something).
_DEFINE = re.compile(
    r"^\s*(?:what\s+(?:is|are)\s+(?:an?\s+)?(?P<a>[^?]+?)|define\s+(?:an?\s+)?(?P<b>[^?.]+?)"
    r"|what\s+does\s+(?:an?\s+)?(?P<c>[^?]+?)\s+mean)\s*[?.]?\s*$",
    re.I,
)
_NOT_TERM = re.compile(
    r"^(?:the|this|that|these|those|it|your|my|our|his|her|their)\b|\b(?:of|in|on|for|to|from|between|and|or)\b|\d",
    re.I,
)


def term_of(question: str) -> str | None:
    """The term ``question`` asks to define (1-3 words), if it asks that."""
    m = _DEFINE.match(question)
    t = m and (m.group("a") or m.group("b") or m.group("c") or "").strip().strip("\"'“”‘’`")
    if not t or len(t.split()) > 3 or _NOT_TERM.search(t):
        return None
    return t


def term(text: str, question: str) -> str:
    """``text``, a definition of what ``question`` asks about, as "Term: definition" ("A verb is a
    word for an action." -> "Verb: a word for an action."); as it is where the question asks for no
    definition or the reply already opens with the term and a colon."""
    t = term_of(question)
    body = text.strip()
    if t is None or not body or re.match(rf"\**{re.escape(t)}\**\s*:", body, re.I):
        return text
    stem = re.escape(t[:-1] if len(t) > 3 and t.endswith("s") else t)
    said = re.match(
        rf"(?:(?:(?:an?|the)\s+)?{stem}\w*|it|this|they)\s+(?:is|are|refers\s+to|means)\s+(?=\w)", body, re.I
    )
    if said:
        body = body[said.end() :]
        if re.match(r"(?:A|An|The|It)\b", body):
            body = body[0].lower() + body[1:]
    return f"{t[0].upper()}{t[1:]}: {body}"


def unbold(text: str) -> str:
    return _BOLD.sub(r"\1", text)


def put(marks: Iterable[str], text: str, question: str = "") -> str:
    """``text`` with ``marks`` on it."""
    for mark in marks:
        if mark == DIGITS:
            text = digits(text)
        elif mark == TERM:
            text = term(text, question)
        elif mark == BOLD:
            text = bold(text, question)
    return text


def take_off(marks: Iterable[str], text: str) -> str:
    """``text`` without the marks that can be taken off (bold); digits stay: "7" is what the answer
    says, in either form."""
    return unbold(text) if BOLD in marks else text


def describe(marks: Iterable[str]) -> list[str]:
    return [_DESCRIBE[m] for m in marks]


def recorded(value) -> tuple[str, ...] | None:
    """The marks of a recorded rule's fourth item (None: not a list of known marks)."""
    if not isinstance(value, list | tuple) or not all(isinstance(m, str) and m in MARKS for m in value):
        return None
    return tuple(m for m in MARKS if m in value)


# A note that asks for a mark: digits ("use digits for numbers, like 7 instead of seven", "write
# numbers as numerals"), bold ("put the answer in bold") or a definition's term ('start definitions
# with the term and a colon, like "Photosynthesis: ..."'), and not one that asks for the opposite.
_ASK_DIGITS = re.compile(r"\b(?:digits?|numerals?|figures)\b", re.I)
_NOT_DIGITS = re.compile(r"\b(?:spell|in words|no digits|not digits|don'?t use digits|never use digits)\b", re.I)
_ASK_BOLD = re.compile(r"\bbold\b|\*\*\w", re.I)
_NOT_BOLD = re.compile(r"\b(?:no|not|don'?t|never|without)\b[^.]{0,20}\bbold\b", re.I)
_ASK_TERM = re.compile(r"\b(?:term|definitions?|define)\b", re.I)
_TERM_FORM = re.compile(r"\bcolon\b|[\"“'‘`]\s*[A-Z][\w -]{0,30}:\s*(?:\.\.\.|…|<)", re.I)


def noted(note: str) -> tuple[str, ...]:
    """The marks ``note`` asks for."""
    out = []
    if _ASK_DIGITS.search(note) and not _NOT_DIGITS.search(note) and re.search(r"\bnumbers?\b|\d", note, re.I):
        out.append(DIGITS)
    if _ASK_TERM.search(note) and _TERM_FORM.search(note):
        out.append(TERM)
    if _ASK_BOLD.search(note) and not _NOT_BOLD.search(note):
        out.append(BOLD)
    return tuple(out)


def shows(mark: str, question: str, target: str, replaced: str | None) -> bool:
    """Whether a correction (``target`` for the reply ``replaced``, None: a reply rated good) shows
    ``mark``: bold around words its question does not hold; numbers the replaced reply said in
    words, said in digits and no number in words left; the term its question asks to define,
    first, with a colon, where the replaced reply did not open so."""
    if mark == BOLD:
        asked = _asked(question)
        return any(
            any(_stem(w) not in asked and w.lower() not in _FUNCTION for w in _TOKEN.findall(b))
            for b in _BOLD.findall(target)
        )
    if mark == TERM:
        t = term_of(question)
        opens = rf"\s*\**{re.escape(t)}\**\s*:" if t else None
        return (
            opens is not None
            and re.match(opens, target, re.I) is not None
            and not (replaced is not None and re.match(opens, replaced, re.I))
        )
    if mark == DIGITS:
        if replaced is None or has_number_words(target) or not has_number_words(replaced):
            return False
        said = set(re.findall(r"\d+", target))
        if not said or not said <= set(re.findall(r"\d+", digits(replaced))):
            return False
        # and says what the reply said, in its words: "Answer: 12" for "The sum of seven and five is
        # twelve." is a format of its own (bench/lessons.py answercolon), not the reply in digits
        words = re.findall(r"\w+", target.lower())
        known = set(re.findall(r"\w+", digits(replaced).lower()))
        return sum(w in known for w in words) >= 0.6 * len(words)
    return False


def stream(chunks: Iterable, marks: tuple[str, ...], question: str) -> Iterator:
    """The engine's stream of Chunks with ``marks``: text is held back until it can be marked —
    the first sentence whole, for bold; a whole word (and the one after "twenty" or "one"), for
    digits — and yielded marked on the chunk that completed it."""
    from shammah.adapters.rule import sentence_ends  # rule.py imports this module

    held = ""  # text not yet written
    first = BOLD in marks or TERM in marks  # the first sentence, where those go, is still to come
    for c in chunks:
        held += c.text
        done = c.finish_reason is not None
        out = ""
        if first:
            ends = sentence_ends(held)
            if not ends and not done:
                yield dataclasses.replace(c, text="")
                continue
            cut = ends[0] if ends else len(held)
            whole = c.finish_reason != "interrupted" or bool(ends)
            out, held, first = put(marks if whole else (), held[:cut], question), held[cut:], False
            if not whole and DIGITS in marks:
                out = digits(out)
        cut = len(held) if done or DIGITS not in marks else _settled(held)
        out += digits(held[:cut]) if DIGITS in marks else held[:cut]
        held = held[cut:]
        yield dataclasses.replace(c, text=out)


def _settled(text: str) -> int:
    """How much of streamed ``text`` holds only whole words whose digits cannot change with what
    comes next: up to its last space, less a last word that may go on as a number ("twenty" ->
    "twenty-one") or tell what "one" is ("one of")."""
    cut = max(text.rfind(" "), text.rfind("\n"))
    while cut > 0:
        last = re.search(r"(\S+)\s*$", text[:cut])
        if last is None or re.sub(r"\W", "", last.group(1).lower()) not in {*_TENS, *_UNITS, "hundred", "and"}:
            return cut
        cut = max(text.rfind(" ", 0, last.start(1)), text.rfind("\n", 0, last.start(1)))
    return 0
