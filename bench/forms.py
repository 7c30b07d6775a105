"""How a form scope's key should be taken (adapters/scope.py, engine/keys.py): the mean hidden state
over all of a question's tokens, or over its first few.

For each choice, on the embedded model at the default key layer, each format lesson of
bench/lessons.py learns its form from its six taught questions (as a job does), and is scored on

- the suite: its held-out paraphrases covered, the suite's unseen controls inside it, and the share
  of the anchor pool inside its radius;
- PROBES, written for this check and used nowhere else: six new questions of each format's form
  (should be covered) and six on the same topics asked another way (should not be).

    .venv/bin/python bench/forms.py            # ~1 min on 2 cores, no training
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lessons import CONTROLS, LESSONS  # noqa: E402

PROBES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "isodate": (
        (
            "When was the Eiffel Tower completed?",
            "When did the Titanic sink?",
            "When did World War II end?",
            "What date did the Berlin Wall fall?",
            "When was the first iPhone released?",
            "When did Columbus reach America?",
        ),
        (
            "Who designed the Eiffel Tower?",
            "Why did the Titanic sink?",
            "Who won World War II?",
            "Where was the Berlin Wall?",
            "Who made the first iPhone?",
            "Who was Columbus?",
        ),
    ),
    "answercolon": (
        (
            "What is 9 + 4?",
            "What is 12 - 5?",
            "How much is 6 times 7?",
            "What is 100 divided by 4?",
            "What is 3 + 3?",
            "Calculate 8 + 9.",
        ),
        (
            "What is a number?",
            "What is the capital of Peru?",
            "How much does a car cost?",
            "What is division?",
            "What is a triangle?",
            "Who invented zero?",
        ),
    ),
    "jsonlist": (
        (
            "Name three vegetables.",
            "List three countries in Africa.",
            "Name four planets.",
            "List three kinds of trees.",
            "Name three musical instruments.",
            "List three sports.",
        ),
        (
            "What is a vegetable?",
            "Which country in Africa is largest?",
            "What is the biggest planet?",
            "Why do trees lose leaves?",
            "Who plays the violin?",
            "What sport is most popular?",
        ),
    ),
    "termcolon": (
        (
            "What is gravity?",
            "Define evaporation.",
            "What is democracy?",
            "What does a noun mean?",
            "Define the word ecosystem.",
            "What is inflation?",
        ),
        (
            "Who discovered gravity?",
            "Where does evaporation happen?",
            "Which country is a democracy?",
            "How many nouns are in English?",
            "Where is the largest ecosystem?",
            "When did inflation start?",
        ),
    ),
}


class Keys(dict):
    """Precomputed keys, called as the KeyOf of adapters/scope.py."""

    tokens = 0

    def __call__(self, text: str):
        return self[text]


def main() -> None:
    import torch

    from shammah.adapters.scope import learn_form
    from shammah.config import ModelConfig
    from shammah.engine.engine import Engine
    from shammah.engine.keys import KEY_TOKENS, default_layer, question_keys
    from shammah.training.online import ANCHOR_PROMPTS

    torch.set_num_threads(2)
    cache = Path.home() / ".cache" / "shammah-bench"
    engine = Engine(ModelConfig(base="embedded", fast_decode="off"), cache).load()
    model, tok = engine.model, engine.tokenizer
    layer = default_layer(model)
    formats = [x for x in LESSONS if x.kind == "format"]
    texts = list(ANCHOR_PROMPTS) + [q for q, _ in CONTROLS]
    texts += [q for x in formats for q in [*(t for t, _ in x.teach), *x.held_out]]
    texts += [q for inn, out in PROBES.values() for q in inn + out]
    texts = list(dict.fromkeys(texts))
    print(f"embedded model, key layer {layer}; the default: the first {KEY_TOKENS} tokens")
    print(
        f"{'key over':<14} {'suite held-out':>14} {'controls in':>11} {'pool in':>8} {'probes: own':>12} {'others':>7}"
    )
    for tokens in (0, 2, 3, 4, 6):
        keys = Keys(zip(texts, question_keys(model, tok, texts, layer, tokens), strict=True))
        keys.tokens = tokens  # learn_form records it in the form
        key_of = keys
        held = ctrl = pool = own = other = 0
        none = []
        leaks = []
        for x in formats:
            form = learn_form([q for q, _ in x.teach], keys, list(ANCHOR_PROMPTS), layer)
            if form is None:
                none.append(x.name)
                continue
            held += sum(form.covers(key_of(q)) for q in x.held_out)
            inside = [q for q, _ in CONTROLS if form.covers(key_of(q))]
            ctrl += len(inside)
            leaks += inside
            pool += sum(form.similarity(key_of(p)) >= form.radius for p in ANCHOR_PROMPTS)
            inn, out = PROBES[x.name]
            own += sum(form.covers(key_of(q)) for q in inn)
            other += sum(form.covers(key_of(q)) for q in out)
        n = len(formats)
        label = "all tokens" if tokens == 0 else f"first {tokens}"
        print(
            f"{label:<14} {held:>10}/{6 * n} {ctrl:>11} {pool / (n * len(ANCHOR_PROMPTS)):>8.0%} "
            f"{own:>8}/{6 * n} {other:>4}/{6 * n}"
            + (f"  no form: {', '.join(none)}" if none else "")
            + (f"  controls inside: {leaks}" if leaks else "")
        )


if __name__ == "__main__":
    main()
