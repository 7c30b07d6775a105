"""A lesson's question asked the other ways people ask it.

A fact taught on six questions is learned for those six wordings; a user then asks "Do you know
the capital of Quenland?" or "Can you tell me who invented the glimmerphone?", a form none of them
used, and the adapter answers with what it learned about the *form* instead ("Mara Okafor knows
the capital of Quenland.", another lesson's answer). Knowledge-injection work finds the same: a
fact is extracted from questions it was not trained on only when it was trained in varied
wordings (Allen-Zhu & Li, "Physics of Language Models: Part 3.1", 2023). So a fact's lessons are
also trained asked the common other ways: as an indirect question ("Do you know …?", "Can you tell
me …?"), as a request ("Tell me …."), and behind an opener ("Quick question: …"). The answer stays
the user's.

Written by hand because no paraphraser fits: the embedded 135M model does not rephrase a question
reliably (it answers it), and a paraphrase model would be a second download. The rules below only
move words of the question; a question they cannot turn (one with "does"/"did", whose verb would
have to be inflected) still gets the opener.
"""

from __future__ import annotations

import re

_WH = {"who", "what", "which", "where", "when", "why", "how", "whose"}
_BE = {"is", "are", "was", "were"}
_DO = {"does", "do"}
# words that would need more than moving: a past ("did"), a perfect ("has"), a modal, a person
_HARD = {"did", "has", "have", "had", "can", "could", "will", "would", "should", "may", "might", "must"}
_PERSON = {"i", "me", "my", "you", "your", "we", "our"}
_PREPOSITIONS = {"into", "to", "from", "of", "in", "on", "at", "with", "for", "about", "by", "under", "over"}
_ARTICLES = {"the", "a", "an"}
# "Tell me the capital of Quenland." / "Name the national animal of Vestoria."
_REQUEST = re.compile(r"(?:tell\s+me|name|give\s+me)\s+(?P<what>.+?)\s*[.?!]?", re.I)

FRAMES = ("Do you know {}?", "Can you tell me {}?", "Tell me {}.")
OPENER = "Quick question: {}"


def _third_person(verb: str) -> str:
    """ "flow" -> "flows", "empty" -> "empties", "reach" -> "reaches"."""
    if re.search(r"[^aeiou]y$", verb):
        return verb[:-1] + "ies"
    if re.search(r"(s|sh|ch|x|z|o)$", verb):
        return verb + "es"
    return verb + "s"


def _participle(word: str) -> bool:
    return len(word) > 3 and word.lower().endswith(("ed", "en"))


def asked_about(question: str) -> str | None:
    """What ``question`` asks for, as words that can follow "Do you know": a noun phrase ("the
    capital of Quenland") or a clause ("who invented the glimmerphone", "where the Ombrel River
    flows"); None where that would take more than moving words (a past, a modal, a question about
    "you")."""
    q = question.strip()
    if m := _REQUEST.fullmatch(q):
        return m.group("what")
    if not q.endswith("?"):
        return None
    words = q[:-1].split()
    if words and words[0].lower() in ("what's", "who's"):
        words = [words[0][:-2], "is", *words[1:]]
    low = [w.lower() for w in words]
    if len(words) < 2 or _PERSON & set(low) or _HARD & set(low[:5]):
        return None
    if low[0] not in _WH and not (low[0] in _PREPOSITIONS and low[1] in _WH):
        return None
    first = words[0].lower() + (" " + " ".join(words[1:]) if len(words) > 1 else "")
    at = next((i for i, w in enumerate(low[:5]) if w in _BE | _DO), None)
    if at is None or at == 0:  # "Who invented the glimmerphone?", "Which sea receives the Ombrel River?"
        return first if low[0] in ("who", "what", "which", "whose") else None
    wh, verb, rest = words[:at], low[at], words[at + 1 :]
    if not rest:
        return None
    wh[0] = wh[0].lower()
    if verb in _DO:  # "Where does the Ombrel River flow?" -> "where the Ombrel River flows"
        v = len(rest) - 1 - (rest[-1].lower() in _PREPOSITIONS and len(rest) > 2)
        if verb == "does":
            rest = [*rest[:v], _third_person(rest[v]), *rest[v + 1 :]]
        return " ".join(wh + rest)
    if at == 1 and low[0] in ("who", "what") and rest[0].lower() in _ARTICLES:
        return " ".join(rest)  # "What is the capital of Quenland?" -> "the capital of Quenland"
    if at == 1 and low[0] in ("who", "what") or low[0] in ("which", "what") and _participle(rest[0]):
        return first  # "Who is in charge of X?", "Which language is spoken in Solvania?": as asked
    if _participle(rest[-1]):  # "When was Orbisco founded?" -> "when Orbisco was founded"
        return " ".join([*wh, *rest[:-1], verb, rest[-1]])
    return " ".join([*wh, *rest, verb])  # "How long is the Dellmar Tunnel?" -> "how long the Dellmar Tunnel is"


def rephrasings(question: str) -> list[str]:
    """``question`` asked in the other common ways (never itself), in a fixed order."""
    q = question.strip()
    out = [OPENER.format(q)]
    if (what := asked_about(q)) is not None:
        out += [f.format(what) for f in FRAMES]
    return [x for x in dict.fromkeys(out) if x.lower() != q.lower()]
