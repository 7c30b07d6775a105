"""A style rule the user wrote out on every answer — an opening ("Ahoy! "), a closing ("Cheers,
Shammah"), or both — or showed by cutting every reply short (a **length**: at most one or two
sentences), or **marks** (adapters/marks.py: numbers in digits, a definition as "Term: ...", the
answer in bold), found in a job's lessons, recorded with the adapter (``"rule"`` in its
shammah.json) and put on every reply by the engine while that adapter is active; and a **word
cap** on the replies the adapter gives itself, in the scope of a register it was trained on.

Why the engine applies it rather than the weights alone: a rule is exact text, and the user meant
it on *every* answer. Trained into a LoRA of the 135M embedded model it was learned (100% of
held-out questions) but cost 0-2 unseen general-knowledge answers a run: the rule moves the start
of every answer, and what the model says after its new opening drifts ("What is the largest
mammal?" -> "Ahoy! Whales."). Applied as text, it is on every answer by construction and the
model answers the content as it would without the rule. A lesson that only writes the rule out,
or only cuts a long reply to its length (:func:`demonstrates`), is then not trained at all, and one
that tells a fact inside it is trained without it (:meth:`Rule.inside`): a job whose lessons only
show a rule trains nothing, and its adapter is its parent's weights with the rule added, in
seconds. (A length's cuts trained everywhere cost 1-2 unseen controls in 3 of 6 seeds and made
the first sentences longer, 67-83% of held-out answers short; the length alone: 100%, none lost.)

Torch-free: the chat, the server and the worker use it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from shammah.adapters import marks as _marks
from shammah.adapters.scope import adapter_meta, words
from shammah.feedback.revise import is_template, names_and_numbers, stated_answer

# Where a sentence ends: . ! or ? (and any closing quote or bracket) before whitespace, or a blank
# line. Written here rather than taken from a sentence splitter (nltk, spaCy): the chat needs it on a
# stream, a few characters at a time, and the rule only ever counts the first one or two sentences.
_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n[ \t]*\n")
_ABBREVIATIONS = frozenset("mr mrs ms dr st vs etc e.g i.e jr sr prof inc ltd u.s approx fig".split())
MAX_SENTENCES = 2  # the longest length rule: beyond that, cutting replies is no register
MAX_WORDS = 30  # the longest word cap: answers of more words are no register of brevity
# Where a sentence too long for a word cap may be cut (:func:`cap_words`): after a comma, semicolon,
# colon or dash, or before a word that starts a clause the sentence stands without ("A telescope is
# a tool | that helps us see in the dark."). Not before "to", "by", "with", "as": what follows them
# completes the sentence ("Purring is a way for cats | to communicate." left "Purring is a way for
# cats.": bench/lessons.py tenwords, 2026-12-07); the last-resort cut keeps it better ("... cats to
# communicate."). A word left dangling at the end of that cut is dropped ("... rooted in the" ->
# "... rooted.").
_CLAUSE = frozenset(
    "that which who whom whose where when while because although though since unless until so but and or "
    "if including such".split()
)
_DANGLING = frozenset(
    "the a an of to in on at for and or but with by from that which who whom whose where when while because "
    "if so as into onto than during about over under after before through between among without within "
    "around across against toward towards upon like such not very also is are was were be been being has "
    "have had do does did can could will would shall should may might must its their his her our your my "
    "this these those".split()
)
# Words a reply opens with in capitals only because they open it: after an opening that does not end
# a sentence ("Well, ", "Captain, ") they are written in lower case ("Well, the sky is blue."). A
# name keeps its capital ("Well, Paris is ..."); so does a common noun ("Well, Bananas are ..."):
# telling those apart takes a model, and a name in lower case is the worse slip.
_OPENERS = frozenset(
    "the a an it its this that these those there they we you he she my our your their in on at to for of "
    "from with yes no sure some many most all each every what when where who how why if as after before "
    "because while here".split()
)


def sentence_ends(text: str) -> list[int]:
    """Offsets just past the end of each sentence of ``text`` that is followed by more text (the
    last sentence, if nothing follows it yet, is not counted: on a stream it may go on). Not an end:
    an abbreviation ("Dr. Smith"), an initial ("J. K. Rowling"), a list's number ("1. Apples")."""
    ends = []
    for m in _END.finditer(text):
        before = text[: m.start()]
        if not before.strip():
            continue
        if m.group().startswith("\n"):
            ends.append(len(before.rstrip()))
            continue
        word = re.search(r"(\S+)$", before)
        w = word.group(1).lower().lstrip("(\"'") if word else ""
        if m.group()[0] == "." and (
            w in _ABBREVIATIONS or re.fullmatch(r"[a-z]", w) or re.search(r"(?:^|\n)\s*\d+$", before)
        ):
            continue
        ends.append(m.end())
    return ends


def sentences(text: str) -> int:
    """How many sentences ``text`` holds."""
    t = text.strip()
    ends = sentence_ends(t)
    return len(ends) + (1 if t[ends[-1] :].strip() else 0) if ends else (1 if t else 0)


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (all of it if it has no more)."""
    ends = sentence_ends(text)
    return text[: ends[n - 1]] if len(ends) >= n else text


def cap_words(text: str, n: int) -> str:
    """``text`` in at most ``n`` words (as ``str.split`` counts them): its first sentences while
    they fit; else its first sentence cut at the last place a clause may end that fits and keeps
    half of them (_CLAUSE: "A telescope is a tool that helps us see in the dark." -> "A telescope is
    a tool."; not "The answer | to this question is ..."), with a full stop; else its first ``n``
    words, less a dangling last word. Written here rather than taken from a
    sentence-compression model: the engine runs it on every capped reply, and it only ever cuts."""
    t = text.strip()
    if len(t.split()) <= n:
        return t
    fit = [e for e in sentence_ends(t) if len(t[:e].split()) <= n]
    if fit:
        return t[: fit[-1]].rstrip()
    ws = t.split()
    keep = 0
    for i in range(max(3, n // 2), min(n, len(ws) - 1) + 1):  # keep ws[:i]: half the cap at least
        if ws[i - 1][-1] in ",;:" or ws[i] in ("-", "–", "—") or ws[i].lower().strip("\"'(") in _CLAUSE:
            keep = i
    if not keep:
        keep = n
        while keep > 2 and ws[keep - 1].lower().strip(",;:") in _DANGLING:
            keep -= 1
    return " ".join(ws[:keep]).rstrip(",;:-–— ") + "."


class Rule(NamedTuple):
    """(opening, closing, sentences, marks, words); compares equal to the plain tuple.
    ``sentences``: the most a reply may hold (0: any number); ``marks``: formats put on every reply
    (adapters/marks.py: numbers in digits, a definition as "Term: ...", the answer in bold);
    ``words``: the most words a reply *the adapter answers* may hold (0: any number; a question
    outside its scope, which the base answers, is not cut: :func:`shared_words`)."""

    opening: str = ""
    closing: str = ""
    sentences: int = 0
    marks: tuple[str, ...] = ()
    words: int = 0

    @classmethod
    def recorded(cls, value) -> Rule | None:
        """The rule in an adapter's metadata (``value``: ``"rule"`` of its shammah.json), if any:
        ``[opening, closing]``, ``[opening, closing, sentences]``, ``[opening, closing, sentences,
        [marks]]`` or ``[opening, closing, sentences, [marks], words]``."""
        ok = (
            isinstance(value, list | tuple)
            and len(value) in (2, 3, 4, 5)
            and all(isinstance(x, str) for x in value[:2])
            and (len(value) == 2 or type(value[2]) is int and 0 <= value[2] <= MAX_SENTENCES)
            and (len(value) < 5 or type(value[4]) is int and 0 <= value[4] <= MAX_WORDS)
        )
        marks = _marks.recorded(value[3]) if ok and len(value) >= 4 else ()
        if not ok or marks is None:
            return None
        rule = cls(value[0], value[1], value[2] if len(value) > 2 else 0, marks, value[4] if len(value) > 4 else 0)
        return rule if rule else None

    def __bool__(self) -> bool:
        return bool(self.opening or self.closing or self.sentences or self.marks or self.words)

    def record(self) -> list:
        """As shammah.json and package manifests hold it: ``[opening, closing]``, with the length
        third, the marks fourth and the word cap fifth only when there are any (what shammah wrote
        before them, and still reads)."""
        if self.words:
            return [self.opening, self.closing, self.sentences, list(self.marks), self.words]
        if self.marks:
            return [self.opening, self.closing, self.sentences, list(self.marks)]
        return [self.opening, self.closing, self.sentences] if self.sentences else [self.opening, self.closing]

    @classmethod
    def of_adapter(cls, path: Path | None) -> Rule | None:
        """The rule recorded beside the adapter at ``path`` (None: no rule, or unreadable metadata)."""
        return cls.recorded(adapter_meta(path).get("rule")) if path is not None else None

    def describe(self) -> str:
        parts = [
            f"starts {self.opening.strip()!r}" if self.opening else "",
            f"ends {self.closing!r}" if self.closing else "",
            f"at most {('one sentence', 'two sentences')[self.sentences - 1]}" if self.sentences else "",
            *_marks.describe(self.marks),
            f"at most {self.words} words where it answers" if self.words else "",
        ]
        return ", ".join(p for p in parts if p)

    def on_replies(self, every: str = "on every reply") -> str:
        """The rule in words, saying where each part goes: ``every`` after the parts written on
        every reply, and the word cap where the adapter answers."""
        parts = Rule(*self[:4]).describe()
        return "; ".join(p for p in (f"{parts} {every}" if parts else "", Rule(words=self.words).describe()) if p)

    def inside(self, text: str) -> str:
        """``text`` without the rule: what the answer says inside it (its numbers in whichever form the
        answer wrote them)."""
        t = _marks.take_off(self.marks, text.strip())
        if self.opening and t.startswith(self.opening.strip()):
            t = t[len(self.opening.strip()) :].lstrip()
        if self.closing and t.endswith(self.closing):
            t = t[: -len(self.closing)].rstrip()
        return t or _marks.take_off(self.marks, text.strip())

    @property
    def _runs_on(self) -> bool:
        """The opening does not end a sentence ("Well, "): the model's first word goes on it."""
        return self.opening.rstrip()[-1:] not in (".", "!", "?", ":", "")

    def _after_opening(self, text: str) -> str:
        """The model's ``text`` as it reads after the opening: its first word in lower case where
        the opening does not end a sentence and the word is a common opener (_OPENERS)."""
        if not self._runs_on:
            return text
        m = re.match(r"\s*([A-Z][a-z]*)\b", text)
        if m is None or m.group(1).lower() not in _OPENERS:
            return text
        return text[: m.start(1)] + text[m.start(1)].lower() + text[m.start(1) + 1 :]

    def apply(self, text: str, question: str = "", covered: bool = True) -> str:
        """``text``, the reply to ``question``, with the rule (a part the model already wrote is not
        written twice). ``covered``: the adapter answered it (False: the base did, out of its scope;
        the word cap is not put on)."""
        t = first_sentences(text.strip(), self.sentences) if self.sentences else text.strip()
        if self.words and covered:
            t = cap_words(t, self.words)
        t = _marks.put(self.marks, t, question)
        if self.opening and not t.startswith(self.opening.strip()):
            t = self.opening + self._after_opening(t)
        if self.closing and not t.endswith(self.closing):
            t = f"{t} {self.closing}" if t else self.closing
        return t

    def stream(self, chunks: Iterable, question: str = "", covered: bool = True) -> Iterator:
        """The engine's stream of Chunks with the rule, for a reply to ``question``: the word cap
        where the adapter answered it (``covered``: the reply held back until it is whole or a word
        over), the marks on the text (held back until a word, or the first sentence, is whole), the
        opening before the first text (held back only until the model's own first characters show
        whether it wrote the opening itself) and the closing on the last chunk, unless the reply
        was interrupted."""
        if self.sentences:
            chunks = _cut(chunks, self.sentences)
        if self.words and covered:
            chunks = _capped(chunks, self.words)
        if self.marks:
            chunks = _marks.stream(chunks, self.marks, question)
        want = self.opening.strip()
        held: list = []
        text = ""
        decided = not want
        for c in chunks:
            text += c.text
            if not decided:
                held.append(c)
                body = text.lstrip()
                if len(body) < len(want) and want.startswith(body) and c.finish_reason is None:
                    continue  # could still be the model's own opening
                if (
                    self._runs_on
                    and not re.match(r"\S+\s", body)
                    and c.finish_reason is None
                    and not body.startswith(want)
                ):
                    continue  # its first word is not whole yet: it may go after the opening in lower case
                decided = True
                if not body.startswith(want):
                    lowered = self._after_opening(body)
                    if lowered != body:  # the one letter changed is the first of the model's text
                        k = next(i for i, h in enumerate(held) if h.text.strip())
                        lead = held[k].text.lstrip()
                        held[k] = dataclasses.replace(held[k], text=lead[0].lower() + lead[1:])
                    held[0] = dataclasses.replace(held[0], text=self.opening + held[0].text.lstrip())
                    text = self.opening + lowered
                c = held.pop()
                yield from held
                held = []
            if c.finish_reason is not None and c.finish_reason != "interrupted" and self.closing:
                if not text.rstrip().endswith(self.closing):
                    sep = "" if not text.strip() or text.endswith((" ", "\n")) else " "
                    c = dataclasses.replace(c, text=c.text + sep + self.closing)
            yield c


def _cut(chunks: Iterable, n: int) -> Iterator:
    """The stream of Chunks ended after its ``n``-th sentence: the text up to it, then a closing
    chunk (finish_reason "stop", the tokens and seconds so far), and the model's generator closed so
    that it stops decoding (engine/generate.py ends generation when its consumer goes away)."""
    t0 = time.perf_counter()
    text, sent, tokens = "", 0, 0
    it = iter(chunks)
    try:
        for c in it:
            text += c.text
            tokens += len(c.token_ids)
            ends = sentence_ends(text)
            if len(ends) < n or c.finish_reason is not None:
                sent = len(text)
                yield c
                if c.finish_reason is not None:
                    return
                continue
            piece = text[sent : ends[n - 1]]
            if piece:
                yield dataclasses.replace(c, text=piece)
            yield dataclasses.replace(
                c, text="", token_ids=(), finish_reason="stop", new_tokens=tokens, seconds=time.perf_counter() - t0
            )
            return
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _capped(chunks: Iterable, n: int) -> Iterator:
    """The stream of Chunks in at most ``n`` words (:func:`cap_words`): held back until the reply
    ends or the word after the ``n``-th is whole (a cut may take back the last few words), then as
    one chunk, and the model's generator closed as :func:`_cut` does."""
    t0 = time.perf_counter()
    text, ids = "", []
    it = iter(chunks)
    try:
        for c in it:
            text += c.text
            ids.extend(c.token_ids)
            if c.finish_reason is not None:
                yield dataclasses.replace(
                    c, text=cap_words(text, n) if len(text.split()) > n else text, token_ids=tuple(ids)
                )
                return
            said = len(text.split())
            if said <= n + 1 and not (said == n + 1 and text[-1].isspace()):
                continue  # where to cut may turn on the word after the n-th ("... a tool | that"): whole
            yield dataclasses.replace(c, text=cap_words(text, n), token_ids=tuple(ids))
            yield dataclasses.replace(
                c, text="", token_ids=(), finish_reason="stop", new_tokens=len(ids), seconds=time.perf_counter() - t0
            )
            return
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def shared_rule(lessons: list) -> Rule | None:
    """(opening, closing) that every lesson's target shares across at least three different
    questions ("Ahoy! ..." on a banana, a dog and the seasons; "... Cheers, Shammah"): a style rule
    written out by the user rather than a fact. The opening ends at punctuation ("Ahoy! ", "Dear
    reader, "), the closing starts after a sentence ("Cheers, Shammah"); None when there is neither
    (a fact, a register, "be brief", or a job whose lessons teach different things)."""
    targets = {
        e.prompt[-1]["content"]: e.responses[0].strip() for e in lessons if e.kind in ("sft", "pair") and e.prompt
    }
    if len(targets) < 3:
        return None
    texts = list(targets.values())
    head = os.path.commonprefix(texts)
    m = re.match(r".*[.!?:,;]\s", head, re.S)
    opening = m.group(0) if m and re.search(r"[A-Za-z]{2}", m.group(0)) else ""
    tail = os.path.commonprefix([t[::-1] for t in texts])[::-1]
    closing = ""  # the longest shared ending that starts a sentence of its own in every answer
    for m in re.finditer(r"(?:^|(?<=[.!?]))\s+(?=\S)", tail):
        c = tail[m.end() :]
        if all(re.search(r"[.!?]\s+" + re.escape(c) + "$", t) for t in texts):
            closing = c if re.search(r"[A-Za-z]{2}", c) else ""
            break
    if any(len(opening) + len(closing) >= len(t) for t in texts):
        return None  # the rule would be the whole answer
    return Rule(opening, closing) if opening or closing else None


# A note that says how to open or close an answer, in quoted words: 'start every answer with
# "Certainly!"', "end with 'Stay curious!'". The verb, then "with" within a few words, then the quote.
_QUOTE = r"[\"“'‘`](?P<words>[^\"”'’`\n]{1,60})[\"”'’`]"
_NOTE_RULE = (
    ("opening", re.compile(r"\b(?:start|begin|open)s?\b[^\"“'‘`\n]{0,40}?\bwith\s+" + _QUOTE, re.I)),
    ("closing", re.compile(r"\b(?:end|finish|close|sign\s+off)s?\b[^\"“'‘`\n]{0,40}?\bwith\s+" + _QUOTE, re.I)),
)
# A name to be addressed by: 'always address me as "Captain"', "call me Boss". Said first, as a
# vocative ("Captain, the ocean is blue."): the opening runs on, so the model's first word follows
# it in lower case (Rule.apply). Quoted, or a name in capitals (1-3 words) right after it.
_ADDRESS = re.compile(
    r"\b(?i:address|call|refer\s+to)\s+(?i:me)\s+(?:(?i:as)\s+)?(?:"
    + _QUOTE
    + r"|(?P<name>[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*){0,2}))",
)


def noted(note: str) -> Rule | None:
    """The opening or closing a note asks for in quoted words ('begin every answer with "Certainly!"'
    -> Rule("Certainly! ")), the name it asks to be addressed by ('always address me as
    "Captain"' -> Rule("Captain, ")), or the marks it asks for ("use digits for numbers" ->
    Rule(marks=("digits",))); None: a quote that shows a form ("Term: ...") is a format's, and a
    note that says none of these is not a rule."""
    parts = {}
    for part, pattern in _NOTE_RULE:
        m = pattern.search(note)
        if m and not is_template(m.group("words")) and re.search(r"[A-Za-z]{2}", m.group("words")):
            parts[part] = m.group("words").strip()
    m = _ADDRESS.search(note)
    name = m and (m.group("words") or m.group("name") or "").strip().rstrip(".,!")
    if name and "opening" not in parts and not is_template(name) and re.search(r"[A-Za-z]{2}", name):
        parts["opening"] = f"{name},"
    marks = _marks.noted(note)
    if not parts and not marks:
        return None
    return Rule(parts["opening"] + " " if "opening" in parts else "", parts.get("closing", ""), 0, marks)


def noted_rule(lessons: list) -> Rule | None:
    """The rule that the notes of at least three note-only lessons, on different questions, ask for
    alike (:func:`noted`): a style rule the user said rather than wrote out on each answer. The
    embedded 135M model does not follow such a note with it in context, so there is no answer of
    its own to learn the rule from (bench/lessons.py --suite fresh, certainly: 0% x3, not learned);
    the engine can write it, as it writes a rule the user wrote out."""
    asked = {
        e.prompt[-1].get("content"): r
        for e in lessons
        if e.kind == "distill" and e.prompt and isinstance(e.meta.get("note"), str) and (r := noted(e.meta["note"]))
    }
    rules = set(asked.values())
    return rules.pop() if len(asked) >= 3 and len(rules) == 1 else None


def shared_marks(lessons: list) -> tuple[str, ...]:
    """The marks (adapters/marks.py) that the corrections of ``lessons`` show on three or more
    different questions, where no answer among them goes against it: every answer in bold ("The
    capital of Italy is **Rome**.") on questions with nothing in common; numbers the corrected
    replies said in words, in digits, and no answer with a number in words; every definition
    asked for opening with its term and a colon ("Noun: a word for a thing.")."""
    said = _said(lessons)
    return tuple(
        mark
        for mark in _marks.MARKS
        if len({q for q, target, replaced in said if _marks.shows(mark, q, target, replaced)}) >= 3
        and not _against(mark, said)
    )


def noted_marks(lessons: list) -> tuple[str, ...]:
    """The marks that the notes of three or more lessons, on different questions, ask for (a note
    alone, or one given with a correction: "write numbers as numerals" beside "An ant has 6 legs."),
    where no correction among them goes against it. Corrections that tell a number the reply got
    wrong show no digits (the number is new, not the reply's in digits): the note says it."""
    asked: dict[str, set] = {m: set() for m in _marks.MARKS}
    for e in lessons:
        note = e.meta.get("note")
        if isinstance(note, str) and e.prompt and e.kind in ("distill", "sft"):
            for m in _marks.noted(note):
                asked[m].add(e.prompt[-1].get("content"))
    said = _said(lessons)
    return tuple(m for m in _marks.MARKS if len(asked[m]) >= 3 and not _against(m, said))


def _said(lessons: list) -> list[tuple[str, str, str | None]]:
    """(question, target, the reply it replaces) of each answer among ``lessons``."""
    return [
        (e.prompt[-1].get("content") or "", e.responses[0].strip(), _replaced(e))
        for e in lessons
        if e.kind in ("sft", "pair") and e.prompt and e.responses
    ]


def _against(mark: str, said: list) -> bool:
    """Whether an answer goes against ``mark``: one not in bold; a definition asked for not opening
    with its term; a number in words."""
    if mark == _marks.BOLD:
        return any("**" not in target for _, target, _ in said)
    if mark == _marks.TERM:
        return any(_marks.term_of(q) and _marks.term(target, q) != target for q, target, _ in said)
    return any(_marks.has_number_words(target) for _, target, _ in said)


def carries(e, rule: Rule) -> bool:
    """Whether a lesson's target shows part of ``rule`` (its opening, its closing or a mark)."""
    opening, closing = rule[0], rule[1]
    target = e.responses[0].strip() if e.responses else ""
    if opening and target.startswith(opening) or closing and target.endswith(closing):
        return True
    question = e.prompt[-1].get("content") if e.prompt else None
    return isinstance(question, str) and any(_marks.shows(m, question, target, _replaced(e)) for m in rule.marks)


def job_rule(lessons: list, parent: Rule | None, own: list | None = None) -> Rule | None:
    """The rule an adapter holds after this job: the one its parent adapter holds (``parent``,
    recorded in the parent's shammah.json), with what the job's ``own`` lessons share on top (a
    new opening or closing replaces the parent's; marks shown or asked for are added to its own;
    its length and word cap stay, the cap for online.py word_cap to settle once the scope is
    known). The replayed lessons of an earlier job do not show a rule taught now ("... Cheers,
    Shammah" after "Ahoy! ...", or "Ahoy! ..." after a fact), so a rule shared by every lesson
    would be none. ``own`` unknown (a job written before jobs said): the lessons that do not show
    the parent's rule."""
    if own is None:
        own = [e for e in lessons if parent is None or not carries(e, parent)]
    new = shared_rule(own) or noted_rule(own) or Rule()
    marks = {*shared_marks(own), *noted_marks(own)}
    parent = parent or Rule()
    marks.update(parent.marks)
    rule = Rule(
        new.opening or parent.opening,
        new.closing or parent.closing,
        parent.sentences,
        tuple(m for m in _marks.MARKS if m in marks),
        parent.words,
    )
    return rule if rule else None


def _replaced(e) -> str | None:
    """The reply lesson ``e`` corrects: a pair's rejected reply, or the one recorded with a
    correction (None: a reply rated good, or a lesson from a dataset)."""
    if e.kind == "pair" and len(e.responses) > 1:
        return e.responses[1]
    replaced = e.meta.get("replaces")
    return replaced if isinstance(replaced, str) else None


def shared_length(lessons: list, rule: Rule | None = None) -> int:
    """The most sentences any answer of ``lessons`` holds, where every correction among them cut
    the reply it corrects to fewer, on three or more different questions (inside ``rule``, if
    any); else 0. That is a user showing a length ("answer in one short sentence": six long replies
    each replaced by one sentence) rather than writing it out. A good reply that is longer, a
    correction that is not shorter, or answers of more than MAX_SENTENCES sentences: no length.
    Whether the lessons are rather a fact about a subject or a format, each of whose answers is one
    line, is for the caller to say (training/online.py: their questions)."""
    inside = rule.inside if rule else str.strip
    answers, cut = _answers_and_cuts(lessons, inside)
    if len(cut) < 3:
        return 0
    # The same few answers to different questions ("Yes", "No", "Yes" ...: at most half as many
    # answers as questions) are what to answer, not how long: a format's answers (bench/lessons.py
    # --suite fresh, yesno: taken for a length, every reply cut to one sentence, 0% x3).
    said = {e.prompt[-1]["content"]: _plain(inside(e.responses[0])) for e in lessons if e.prompt and e.responses}
    if 2 * len(set(said.values())) <= len(said):
        return 0
    n = max(sentences(a) for a in answers)
    if not 1 <= n <= MAX_SENTENCES:
        return 0
    return n if all(sentences(reply) > n for reply in cut.values()) else 0


def _answers_and_cuts(lessons: list, inside: Callable[[str], str]) -> tuple[list[str], dict[str, str]]:
    """(every target of ``lessons``, question -> the reply its correction replaced), inside a rule."""
    answers = [inside(e.responses[0]) for e in lessons if e.kind in ("sft", "pair") and e.responses]
    cut = {
        e.prompt[-1]["content"]: inside(r)
        for e in lessons
        if e.prompt and e.kind in ("sft", "pair") and (r := _replaced(e)) is not None
    }
    return answers, cut


def shared_words(lessons: list, rule: Rule | None = None) -> int:
    """The most words any answer of ``lessons`` holds (inside ``rule``), where each is one plain
    sentence of at least three words and of at most MAX_WORDS, and every correction among them, on
    three or more different questions, cut the reply it corrects to fewer words than that; else 0.
    A register the user showed by correcting long replies to short ones on questions of one kind
    (bench/lessons.py --suite fresh, tenwords: "Why do birds migrate?" -> "Birds migrate to find food
    and warmer weather."): the lessons are trained, and their length is a cap on what the adapter
    answers, for the few answers training leaves long (67-83% of held-out answers within ten words
    trained alone). Whether the lessons rather tell of a subject, where a cut could take the fact
    off, is for the caller to say (training/online.py: the scope)."""
    answers, cut = _answers_and_cuts(lessons, rule.inside if rule else str.strip)
    plain = all(
        3 <= len(a.split()) <= MAX_WORDS and "\n" not in a and a[-1] in ".!?" and sentences(a) == 1 for a in answers
    )
    if len(cut) < 3 or not answers or not plain:
        return 0
    n = max(len(a.split()) for a in answers)
    return n if all(len(r.split()) > n for r in cut.values()) else 0


def _plain(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def says_new(e, rule: Rule) -> bool:
    """Whether correction ``e`` names, inside ``rule``, a number or a name that neither its question
    nor the reply it corrects has ("Ahoy! Our team lead is Sam.", a long reply cut to "The meeting
    is at 3."): a fact told in the rule's words, trained whatever its question. A reply rated good
    says nothing the model did not."""
    replaced = _replaced(e)
    if replaced is None or not e.responses or not e.prompt:
        return False
    known = f"{e.prompt[-1].get('content')} {_marks.put(rule.marks, replaced)}".lower()
    return any(t.lower() not in known for t in names_and_numbers(rule.inside(e.responses[0])))


def keeps_length(e, rule: Rule) -> bool:
    """Whether lesson ``e`` shows ``rule``'s length: its target (inside the rule) holds no more
    sentences than the length allows and, where it corrects a reply, that reply held more. The
    chat stores replies as the engine wrote them, with the length in force, so a correction made
    once the length is a rule cuts nothing and is never taken for one of these."""
    if not rule.sentences or not e.responses:
        return False
    if sentences(rule.inside(e.responses[0])) > rule.sentences:
        return False
    replaced = _replaced(e)
    return replaced is None or sentences(rule.inside(replaced)) > rule.sentences


def demonstrates(e, rule: Rule, rare: Callable[[str], bool]) -> bool:
    """Whether lesson ``e`` only shows ``rule``: its target carries the rule (an opening or closing
    it writes out, or a long reply cut to the rule's length), its question names no subject (no
    word the model has no token for, adapters/scope.py) and its answer no new name or number
    (:func:`says_new`). Six such answers on unrelated questions are how a user writes a rule out;
    what they say inside it is what the model would say anyway, in the user's words. A note alone
    that asks for part of the rule shows only it, whatever its question names: it has no answer to
    tell a fact in (bench/lessons.py --suite later, boss: "What do silkworms make?" named a subject,
    and its note was reported as not learned while the rule answered it)."""
    if e.kind == "distill" and e.prompt and isinstance(e.meta.get("note"), str):
        said = noted(e.meta["note"])  # a note-only lesson that asks for part of the rule, and nothing else
        question = e.prompt[-1].get("content")
        if isinstance(question, str) and stated_answer(e.meta["note"], question) is not None:
            return False  # it also states the answer ("wrong: it is 412 meters; use digits"): trained
        return said is not None and (
            any(part and part == mine for part, mine in zip(said[:2], rule[:2], strict=True))
            or any(m in rule.marks for m in said.marks)
        )
    if e.kind not in ("sft", "pair") or not e.prompt or not (carries(e, rule) or keeps_length(e, rule)):
        return False
    question = e.prompt[-1].get("content")
    if not isinstance(question, str) or any(rare(w) for w in words(question)):
        return False
    # A correction that shows a mark is about the mark, whatever else it puts right: with no subject
    # in its question, what it says would be trained everywhere (bench/lessons.py bold, whose fixes
    # also named "Rome" for "Il Coriobella": 1 unseen control lost alone, 2-4 in sequence before a fact)
    target, replaced = (e.responses[0] if e.responses else ""), _replaced(e)
    if any(_marks.shows(m, question, target, replaced) for m in rule.marks):
        return True
    return not says_new(e, rule)


def without_rule(rule: Rule, examples: list) -> list:
    """``examples`` with the rule taken off every response (targets, rejected replies, good ones):
    the engine writes the rule, so the weights learn only what the answers say inside it."""
    return [
        dataclasses.replace(e, responses=tuple(rule.inside(r) for r in e.responses)) if e.responses else e
        for e in examples
    ]
