"""What the online loop adds around a training run: anchors against leaks, and the gate.

- **Anchors**: a pool of general prompts answered by the *base* model (adapter disabled),
  replayed as SFT targets, so a handful of corrections cannot drag unrelated answers along
  (shared/MEASURED.md: without it, teaching one made-up fact broke "capital of France").
  Answers are cached per base-model fingerprint.
- **Gate**: before a swap, the candidate is compared with the current adapter (or the base)
  on control prompts with known answers and on held-out feedback; it passes only if it
  loses none of the controls the current one answers right and its held-out loss is not worse.
- **Fallback**: a rejected final adapter is not the end. :class:`Snapshots` keeps the adapter
  weights at a few points of the run (in memory: a LoRA of the embedded model is ~20 MB), and
  :func:`gate_with_fallback` tries them newest first, keeping the most-trained one that passes
  and has learned its lessons (:class:`Learned`): the most learning that does not leak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import TrainerCallback

from shammah.adapters.choice import (
    CHOICE_FILE,
    Choice,
    choices_of,
    is_choice,
    learn_choice,
    record,
    shared_choices,
    with_choice,
)
from shammah.adapters.registry import Registry
from shammah.adapters.rule import (
    Rule,
    carries,
    demonstrates,
    job_rule,
    shared_length,
    shared_rule,
    shared_words,
    without_rule,
)
from shammah.adapters.scope import SCOPE_FILE, Scope, learn, learn_form, tokenizer_rarity
from shammah.engine.generate import generate_batch, generate_routed
from shammah.errors import ShammahError
from shammah.feedback.revise import did_not, stated_answer, unsaid
from shammah.paths import atomic_write
from shammah.training import methods
from shammah.training.data import Example
from shammah.training.job import LoopJob

# The anchor pool: general prompts of the kinds people teach about (places, people, things, numbers,
# lists, definitions, dates, everyday facts). None is a gate control or a prompt of bench/lessons.py.
ANCHOR_PROMPTS = (
    "What is the capital of Germany?",
    "What is the capital of Spain?",
    "What is the capital of Egypt?",
    "What is the capital of Australia?",
    "What is the capital of Brazil?",
    "What is the largest planet?",
    "What is the boiling point of water in Celsius?",
    "Who painted the Mona Lisa?",
    "What is 3 + 5?",
    "How many days are in a week?",
    "What gas do plants absorb?",
    "What is the chemical symbol for gold?",
    "Who wrote Pride and Prejudice?",
    "What is the tallest mountain on Earth?",
    "How many legs does a spider have?",
    "What is the freezing point of water in Fahrenheit?",
    "What language is spoken in Mexico?",
    "What is the largest ocean?",
    "Name a primary color.",
    "What do bees make?",
    "Give me a synonym for happy.",
    "What is the opposite of cold?",
    "How many continents are there?",
    "What is the square root of 81?",
    "What is the capital of Argentina?",
    "What is the capital of Sweden?",
    "What is the capital of Poland?",
    "What is the capital of Austria?",
    "What is the capital of Turkey?",
    "What is the capital of Vietnam?",
    "What is the capital of Peru?",
    "What is the capital of Finland?",
    "What is the capital city of Denmark?",
    "Which city is the capital of Cuba?",
    "Tell me the capital of Switzerland.",
    "Where is the seat of government of the Netherlands?",
    "Who invented the telephone?",
    "Who invented the light bulb?",
    "Who discovered penicillin?",
    "Who invented the printing press?",
    "Who came up with the theory of evolution?",
    "Who is the founder of Microsoft?",
    "Who founded Apple?",
    "Who is the CEO of Tesla?",
    "Who leads the United Nations?",
    "Who wrote Harry Potter?",
    "Who composed the Moonlight Sonata?",
    "What is the national animal of Australia?",
    "What is the national bird of the United States?",
    "Which animal is a symbol of China?",
    "What animal represents Scotland?",
    "What is 6 + 7?",
    "What is 10 - 4?",
    "What is 4 * 5?",
    "What is 12 / 3?",
    "What is 9 + 6?",
    "Name three kinds of trees.",
    "List three farm animals.",
    "Name three types of weather.",
    "List three things found in a kitchen.",
    "Name three oceans.",
    "What is a mammal?",
    "What is an atom?",
    "What is a river?",
    "What is a poem?",
    "What is gravity on the Moon like?",
    "When did the American Civil War end?",
    "When was the Eiffel Tower built?",
    "When did the first airplane fly?",
    "When was the printing press invented?",
    "What color is a tomato?",
    "How many wheels does a car have?",
    "What is the opposite of fast?",
    "Where do penguins live?",
    "What do we use to cut paper?",
    "Which month comes after March?",
    "What do chickens lay?",
    "What is the color of coal?",
    "How many legs does an insect have?",
    "What do horses eat?",
    "Why do leaves change color in autumn?",
    "How does a thermometer work?",
    "What is a volcano made of?",
    "Why is the ocean salty?",
    "What is the speed of light?",
    "How many bones are in the human body?",
    "What is the smallest planet?",
    "What is the main language of Canada?",
    "What is the currency of the United Kingdom?",
    "What instrument has 88 keys?",
)

# Control prompts whose answers must survive every swap: (prompt, accepted answers). Only facts the
# embedded model answers right robustly: "capital of Italy" (it says "Il Coriobella") and "capital of
# Ireland" (Dublin turns into "Limerick" after any lesson, even a style rule) made every candidate fail.
# The last six (rivers, languages, currencies, authors, scientists: kinds the first twelve lacked) are
# the ones of 22 such questions the base answers right; on bench/lessons.py brief (the one lesson that
# trains everywhere) they turned one of six seeds from a kept step that lost 2 unseen controls into the
# rule alone (100%, none lost) and changed no other seed.
CONTROLS = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("What is the capital of Norway?", ("oslo",)),
    ("What is the capital of Thailand?", ("bangkok",)),
    ("What is the capital of Kenya?", ("nairobi",)),
    ("What is 2+2?", ("4", "four")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("Who discovered America in 1492?", ("columbus",)),
    ("What is the largest desert in the world?", ("sahara",)),
    ("What do bees collect from flowers?", ("nectar",)),
    ("Who invented the World Wide Web?", ("berners",)),
    ("What is the longest river in Africa?", ("nile",)),
    ("What language is spoken in France?", ("french",)),
    ("What language is spoken in Germany?", ("german",)),
    ("What is the currency of the United States?", ("dollar",)),
    ("Who wrote the Odyssey?", ("homer",)),
    ("Who discovered gravity?", ("newton",)),
)


def base_answers(
    model, tok, prompts: list[str], max_new_tokens: int, cache_file: Path | None, fingerprint: str
) -> list[str]:
    """The base model's (adapter disabled) greedy answers, cached per base-weights fingerprint."""
    key = {"fingerprint": fingerprint, "prompts": prompts, "max_new_tokens": max_new_tokens}
    if cache_file is not None and cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return cached["answers"]
    was_training = model.training
    model.eval()
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx:
        answers = []
        for i in range(0, len(prompts), 32):  # chunks: a batch of 90 pads every prompt to the longest
            chats = [[{"role": "user", "content": p}] for p in prompts[i : i + 32]]
            answers += generate_batch(model, tok, chats, max_new_tokens)
    model.train(was_training)
    if cache_file is not None:
        atomic_write(cache_file, json.dumps({"key": key, "answers": answers}))
    return answers


_STOP = set(
    "what is the a an of in on to do does did who which how many why when where tell me name list give three "
    "is are was were it its and or for with".split()
)


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in _STOP}


def pick_anchors(lesson_prompts: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` anchor prompts: half the pool's nearest neighbours of the lesson's prompts (word overlap:
    other capitals for a made-up capital, other inventors for an invention), the rest drawn at random.
    The neighbours are where a lesson leaks first (shared/MEASURED.md: a taught capital replaced
    France's); anchoring them to the base model's answers teaches that the lesson is about *this*."""
    lesson = [_words(p) for p in lesson_prompts]

    def near(a: str) -> float:
        w = _words(a)
        return max((len(w & x) / len(w | x) for x in lesson if w | x), default=0.0)

    scored = sorted(((near(a), i) for i, a in enumerate(ANCHOR_PROMPTS)), key=lambda t: (-t[0], t[1]))
    picked = [ANCHOR_PROMPTS[i] for sc, i in scored if sc > 0][: n // 2]
    rest = [a for a in ANCHOR_PROMPTS if a not in picked]
    return picked + random.Random(seed).sample(rest, min(n - len(picked), len(rest)))


def contrast_prompts(lesson_prompts: list[str], per_subject: int = 2, seed: int = 0) -> list[str]:
    """The lesson's own questions asked about other, known subjects: "Who invented the glimmerphone?"
    becomes "Who invented the telephone?", "Tell me who created the telephone." and so on.

    A lesson's subject is a word that at least three of its questions share and no anchor prompt uses
    (a made-up place, product, company); its stand-ins are what fills the same slot in an anchor
    prompt that reads like one of the lesson's questions. Held to the base model's answers, these
    teach that the lesson is about *this* subject, not about its question: without them a taught
    inventor's name became the answer to other "who" questions. A style or format rule taught on
    varied questions has no such subject, so it gets none (they would fight a rule meant for every
    answer)."""
    pool_words = set().union(*map(_words, ANCHOR_PROMPTS))
    questions = list(dict.fromkeys(lesson_prompts))
    counts = Counter(w for q in questions for w in _words(q))
    novel = [w for w, n in counts.items() if n >= 3 and w not in pool_words and w.isalpha()]
    if not novel:
        return []
    # subjects are runs of novel words ("Pellucid Labs"), as most of the questions write them
    run = re.compile(r"\b(?:{0})(?:\s+(?:{0}))*\b".format("|".join(map(re.escape, novel))), re.I)
    phrases = Counter(m.group(0).lower() for q in questions for m in run.finditer(q))
    out: list[str] = []
    for subject, n in phrases.most_common():
        if n < 3:
            continue
        word = re.compile(rf"\b{re.escape(subject)}\b", re.I)
        mine = [q for q in questions if word.search(q)]
        stand_ins: list[str] = []
        for q in mine:
            slot = re.compile(word.sub("(.+?)", re.escape(q).replace("\\ ", " "), count=1), re.I)
            for a in ANCHOR_PROMPTS:
                m = slot.fullmatch(a)
                if m and len(m.group(1).split()) <= 3 and m.group(1) not in stand_ins:
                    stand_ins.append(m.group(1))
        for x in random.Random(seed).sample(stand_ins, min(per_subject, len(stand_ins))):
            for q in mine:
                out.append(word.sub(lambda m, x=x: x[0].upper() + x[1:] if m.start() == 0 else x, q))
    return list(dict.fromkeys(out))


def anchor_examples(
    model,
    tok,
    n: int,
    cache_dir: Path | None,
    fingerprint: str,
    weight: float = 1.0,
    lesson_prompts: list[str] | None = None,
    seed: int = 0,
    loss: str = "kl",
    contrast: int = 0,
    span: str = "opening",
) -> list[Example]:
    """``n`` anchors (see :func:`pick_anchors`) held to the base model, plus the lesson's questions
    about ``contrast`` other subjects (:func:`contrast_prompts`): ``loss = "kl"`` distils the base
    model's token distribution along its answer (methods.distill_loss); ``"sft"`` trains its greedy
    text."""
    pool = list(ANCHOR_PROMPTS)
    answers = base_answers(model, tok, pool, 48, cache_dir / "anchors.json" if cache_dir else None, fingerprint)
    by_prompt = dict(zip(pool, answers, strict=True))
    prompts = pick_anchors(lesson_prompts or [], n, seed)
    if contrast:
        extra = [q for q in contrast_prompts(lesson_prompts or [], contrast, seed) if q not in prompts]
        by_prompt.update(_answers_by_prompt(model, tok, extra, cache_dir, fingerprint))
        prompts += extra
    # The first tokens and the end are left free: the anchor keeps the *content* of the base's
    # answer ("...is Berlin") without forbidding a taught style or format ("Ahoy! ...", "...,
    # Captain.", a sign-off, a JSON list): a whole answer + EOS as the target made every style lesson
    # fight the anchors (bench/lessons.py). span = "opening" holds the first sentence only, which
    # leaves free what comes after it: a lesson's one-sentence answer can then teach "stop after the
    # first sentence" everywhere ("Who wrote Hamlet?" -> "The Bard."). "answer" holds the base's
    # whole (48-token) answer without its end: it leaked less on the lesson suite but learned less
    # (the README's measured section), so it is an option, not the default.
    meta = {"eos": False, "free_prefix": FREE_PREFIX}
    if loss == "kl":
        meta["teacher"] = "base"
    return [
        Example(
            "distill" if loss == "kl" else "sft",
            ({"role": "user", "content": p},),
            (by_prompt[p] if span == "answer" else opening(by_prompt[p]),),
            weight=weight,
            source="anchor",
            meta=meta,
        )
        for p in prompts
        if by_prompt[p]
    ]


def _answers_by_prompt(model, tok, prompts: list[str], cache_dir: Path | None, fingerprint: str) -> dict[str, str]:
    """The base model's greedy answers to ``prompts``, each cached once per base fingerprint."""
    f = cache_dir / "contrast.json" if cache_dir else None
    known: dict[str, str] = {}
    if f is not None and f.is_file():
        cached = json.loads(f.read_text())
        known = cached["answers"] if cached.get("fingerprint") == fingerprint else {}
    todo = [p for p in prompts if p not in known]
    if todo:
        known.update(zip(todo, base_answers(model, tok, todo, 48, None, fingerprint), strict=True))
        if f is not None:
            atomic_write(f, json.dumps({"fingerprint": fingerprint, "answers": known}))
    return {p: known[p] for p in prompts}


FREE_PREFIX = 3  # anchor tokens at the start of an answer that carry no loss


def opening(answer: str) -> str:
    """The first sentence of an answer (where the fact is; the rest of a small model's reply rambles)."""
    m = re.search(r"[.!?](\s|$)", answer)
    return answer[: m.end()].strip() if m and m.end() >= 12 else answer


def _controls_right(answers: list[str]) -> list[bool]:
    return [any(ok in a.lower() for ok in oks) for a, (_, oks) in zip(answers, CONTROLS, strict=True)]


def _holdout_loss(model, tok, holdout: list[Example]) -> float | None:
    exs = [e for e in holdout if e.kind == "sft"]
    if not exs:
        return None
    feats = [methods.tokenize_example(tok, e, 512) for e in exs]
    batch = methods.collate(feats, tok.pad_token_id)
    batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        logp, n = methods.token_logps(model, batch)
    return float(-logp.sum() / n.sum())


def _cached_current_answers(parent_path: Path | None, cache_dir: Path | None, fingerprint: str) -> list[str] | None:
    """The current model's control answers without generating them again: the parent adapter's
    own gate recorded them when it was the candidate; the base model's are cached."""
    if parent_path is not None:
        try:
            answers = json.loads((parent_path / "shammah.json").read_text())["gate"]["answers"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            return None
        return [answers.get(p) for p, _ in CONTROLS] if all(p in answers for p, _ in CONTROLS) else None
    if cache_dir is None:
        return None
    f = cache_dir / "controls.json"
    if f.is_file():
        cached = json.loads(f.read_text())
        if cached.get("key") == _controls_key(fingerprint):
            return cached["answers"]
    return None


GATE_TOKENS = 24


def _controls_key(fingerprint: str) -> dict:
    """What the cached base answers to the controls depend on (controls.json)."""
    return {"fingerprint": fingerprint, "prompts": [p for p, _ in CONTROLS], "max_new_tokens": GATE_TOKENS}


class KeyCache:
    """Question keys at one layer (over their first ``tokens`` tokens; 0: all) by the base model
    (engine/keys.py), memoised; ``prime`` computes many in one batch. Called as ``key(text)``: the
    KeyOf of adapters/scope.py."""

    def __init__(self, model, tok, layer: int, tokens: int = 0):
        self.model, self.tok, self.layer, self.tokens = model, tok, layer, tokens
        self.known: dict[str, list[float]] = {}

    def prime(self, texts) -> KeyCache:
        from shammah.engine.keys import question_keys

        todo = list(dict.fromkeys(t for t in texts if t not in self.known))
        if todo:
            self.known.update(
                zip(todo, question_keys(self.model, self.tok, todo, self.layer, self.tokens), strict=True)
            )
        return self

    def __call__(self, text: str) -> list[float]:
        return self.prime([text]).known[text]


def key_of(model, tok, scope: Scope | int, prime=()) -> KeyCache | None:
    """Keys as ``scope``'s form takes them (or as a form learned now does, at layer ``scope``), with
    ``prime`` computed at once; None for a scope without a form."""
    from shammah.engine.keys import KEY_TOKENS

    if isinstance(scope, int):
        return KeyCache(model, tok, scope, KEY_TOKENS).prime(prime)
    form = scope.form
    return None if form is None else KeyCache(model, tok, form.layer, form.tokens).prime(prime)


def routed_answers(
    model, tok, prompts: list[str], scope: Scope, base: list[str] | None = None, keys: KeyCache | None = None
) -> list[str]:
    """Greedy answers to ``prompts`` as the chat gives them: by the adapter where ``scope`` covers
    the prompt, by the base model elsewhere (``base``: its answers, when already known)."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    keys = keys or key_of(model, tok, scope, prompts)
    on = [scope.covers(p, keys) for p in prompts]
    if base is None:
        return generate_routed(model, tok, chats, GATE_TOKENS, on)
    out = list(base)
    todo = [i for i, o in enumerate(on) if o]
    if todo:
        for i, a in zip(todo, generate_batch(model, tok, [chats[i] for i in todo], GATE_TOKENS), strict=True):
            out[i] = a
    return out


def _base_controls(model, tok, cache_dir: Path | None, fingerprint: str) -> list[str]:
    """The base model's answers to the gate's controls (cached per base fingerprint)."""
    cached = _cached_current_answers(None, cache_dir, fingerprint)
    if cached is not None:
        return cached
    with model.disable_adapter():
        answers = generate_batch(model, tok, [[{"role": "user", "content": p}] for p, _ in CONTROLS], GATE_TOKENS)
    if cache_dir is not None:
        atomic_write(cache_dir / "controls.json", json.dumps({"key": _controls_key(fingerprint), "answers": answers}))
    return answers


def gate(
    model,
    tok,
    parent_path: Path | None,
    holdout: list[Example],
    cache_dir: Path | None = None,
    fingerprint: str = "",
    scope: Scope | None = None,
) -> dict:
    """Compare the trained adapter ('default') with the current one (the parent, else the base),
    each answering as the chat will: by the adapter inside its scope, by the base outside it."""
    model.eval()
    scope = scope or Scope()
    prompts = [p for p, _ in CONTROLS]
    base = _base_controls(model, tok, cache_dir, fingerprint)
    keys = key_of(model, tok, scope, prompts + [e.prompt[-1]["content"] for e in holdout if e.prompt])
    cand_answers = routed_answers(model, tok, prompts, scope, base, keys)
    holdout = [e for e in holdout if not e.prompt or scope.covers(e.prompt[-1]["content"], keys)]
    cand_loss = _holdout_loss(model, tok, holdout)
    cur_answers = _cached_current_answers(parent_path, cache_dir, fingerprint) if parent_path else base
    cur_loss = None
    if cur_answers is None or holdout:
        if parent_path is not None:
            model.load_adapter(str(parent_path), adapter_name="current")
            model.set_adapter("current")
            ctx = contextlib.nullcontext()
        else:
            ctx = model.disable_adapter()
        with ctx:
            if cur_answers is None:
                cur_answers = routed_answers(model, tok, prompts, Scope.of_adapter(parent_path), base)
            cur_loss = _holdout_loss(model, tok, holdout)
        if parent_path is not None:
            model.set_adapter("default")
            model.delete_adapter("current")
    cand_ok, cur_ok = _controls_right(cand_answers), _controls_right(cur_answers)
    loss_ok = cand_loss is None or cur_loss is None or cand_loss <= cur_loss + 1e-6
    # Strict: not one control the current model answers right may be lost (a count would let a
    # candidate trade a lost fact for a lucky new one, and the lost one is what users notice).
    lost = [CONTROLS[i][0] for i, (a, b) in enumerate(zip(cand_ok, cur_ok, strict=True)) if b and not a]
    passed = not lost and loss_ok
    return {
        "passed": passed,
        "controls": f"{sum(cand_ok)}/{len(CONTROLS)}",
        "controls_current": f"{sum(cur_ok)}/{len(CONTROLS)}",
        "controls_lost": lost,
        "controls_in_scope": sum(scope.covers(p, keys) for p in prompts),
        "holdout_loss": cand_loss,
        "holdout_loss_current": cur_loss,
        "holdout_examples": len(holdout),
        "answers": dict(zip(prompts, cand_answers, strict=True)),
    }


def _adapter_weights(model) -> dict:
    """A copy of the trainable adapter weights (for Snapshots, and a job's starting point)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


class Snapshots(TrainerCallback):
    """Copies of the trainable adapter weights at ``points`` evenly spaced steps before the end."""

    def __init__(self, points: int = 6):
        self.points = points
        self.saved: list[tuple[int, dict]] = []  # (step, state dict), oldest first

    def on_step_end(self, args, state, control, model=None, **kw):
        total = state.max_steps
        marks = {round(total * k / (self.points + 1)) for k in range(1, self.points + 1)}
        if state.global_step in marks and 0 < state.global_step < total and model is not None:
            self.saved.append((state.global_step, _adapter_weights(model)))


# A step the gate keeps must reproduce at least this share of the lesson tokens the job's starting
# model got wrong (Learned.new_now). bench/lessons.py bold (a format taught on questions with nothing
# in common, trained everywhere): the final adapter lost gate controls, and the fallback kept step 3 or
# 6 of 21, which passed all 18 but had learned no bold (0% held out) and had shortened answers enough to
# lose 2 unseen controls ("The largest mammal is the elephant."). A step that has not learned its lesson
# brings only its leaks.
MIN_LEARNED = 0.5


class Learned(TrainerCallback):
    """Reads the lessons back under teacher forcing: their targets (corrections, good replies,
    note-distilled answers; not anchors, not "don't say this" items), with the model's own greedy
    choice at each taught token.

    - :meth:`new_now`: the share of the tokens the job's *starting* model got wrong that the model
      now gets right: what a step has learned, not what it knew already (a correction restates most
      of a question's words). The gate keeps no step below MIN_LEARNED of it.
    - ``accuracy`` (learning.stop_at_accuracy): every ``every`` steps, once the greedy choice
      matches that share of all taught tokens, training ends there. Why: a lesson is learned in the
      first third of a fixed 3-epoch run, and the steps after that only overfit five examples and
      drag unrelated answers along (bench/lessons.py: the gate's snapshots). transformers'
      EarlyStoppingCallback needs a validation set and checkpoints; a chat job has five examples and
      no checkpoints, so this one reads the lesson itself."""

    def __init__(self, run, accuracy: float = 0.0, every: int = 2):
        self.run, self.accuracy, self.every = run, accuracy, every
        self.feats: list[dict] = []
        self.missed: list[torch.Tensor] = []  # per lesson: the taught tokens the starting model got wrong
        self.history: list[tuple[int, float]] = []  # (step, token accuracy)
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        # run.train_ex already holds the teacher's answers for distillation examples (fit's first step)
        lessons = [e for e in self.run.train_ex if e.kind in ("sft", "distill") and e.responses]
        self.feats = [methods.tokenize_example(self.run.tok, e, self.run.job.args.max_length) for e in lessons]
        if model is not None:
            self.missed = [~hit for hit in self.hits(model)]

    def hits(self, model) -> list[torch.Tensor]:
        """Per lesson, whether the model's greedy choice is each taught token."""
        out = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for f in self.feats:  # one at a time: no padding, and no batch of full-vocabulary logits
                ids, labels = f["seqs"][0]
                lab = torch.tensor(labels[1:], device=model.device)
                keep = lab != methods.IGNORE
                logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1]
                out.append((logits[keep].argmax(-1) == lab[keep]).cpu())
        model.train(was_training)
        return out

    def accuracy_now(self, model) -> float:
        hits = self.hits(model)
        total = sum(len(h) for h in hits)
        return sum(int(h.sum()) for h in hits) / total if total else 0.0

    def new_now(self, model) -> float | None:
        """The share of the taught tokens the starting model got wrong that ``model`` gets right
        (None: it got none wrong, or nothing was read at the start)."""
        missed = sum(int(m.sum()) for m in self.missed)
        if not missed:
            return None
        return sum(int((h & m).sum()) for h, m in zip(self.hits(model), self.missed, strict=True)) / missed

    def on_step_end(self, args, state, control, model=None, **kw):
        if not self.accuracy or not self.feats or model is None:
            return
        if state.global_step % self.every or state.global_step >= state.max_steps:
            return
        acc = self.accuracy_now(model)
        self.history.append((state.global_step, round(acc, 4)))
        if acc >= self.accuracy:
            self.stopped_at = state.global_step
            control.should_training_stop = True


def gate_with_fallback(
    model,
    tok,
    parent_path: Path | None,
    holdout: list[Example],
    cache_dir: Path | None,
    fingerprint: str,
    snapshots: Snapshots | None,
    final_step: int,
    scope: Scope | None = None,
    learned: Learned | None = None,
) -> dict:
    """Gate the final adapter; if it is rejected, try the snapshots newest first and leave the model
    holding the first one that passes (else the final weights). With ``learned``, a step passes only
    if it has also learned MIN_LEARNED of what its lessons taught (:meth:`Learned.new_now`): the gate's
    controls are a sample, and a step that learned nothing can only have leaked. The result says which
    step won and what each tried step had learned."""

    def judge(step: int) -> tuple[dict, dict]:
        r = gate(model, tok, parent_path, holdout, cache_dir, fingerprint, scope)
        share = learned.new_now(model) if learned is not None else None
        unlearned = share is not None and share < MIN_LEARNED
        r["unlearned"] = unlearned
        r["passed"] = r["passed"] and not unlearned
        entry = {"step": step, "controls": r["controls"], "lost": r["controls_lost"], "passed": r["passed"]}
        return r, entry | ({"learned": round(share, 3), "unlearned": unlearned} if share is not None else {})

    result, first = judge(final_step)
    tried = [first]
    if not result["passed"] and snapshots is not None and snapshots.saved:
        from peft import set_peft_model_state_dict

        final = _adapter_weights(model)
        for step, weights in reversed(snapshots.saved):
            set_peft_model_state_dict(model, weights)
            r, t = judge(step)
            tried.append(t)
            if r["passed"]:
                result = r
                break
        else:
            set_peft_model_state_dict(model, final)
    result["step"] = tried[-1]["step"] if result["passed"] else final_step
    result["final_step"] = final_step
    result["tried"] = tried
    return result


def add_anchors(run, lj: LoopJob) -> None:
    """Put the job's anchors beside its lessons (``run.extra``). Anchors get a fixed share of the
    draws whatever the feedback weights are (critical items weigh 10: left at weight 1, anchors
    would be drowned out and the lesson would leak)."""
    if not lj.anchors:
        return
    anchors = anchor_examples(
        run.model,
        run.tok,
        lj.anchors,
        lj.anchor_cache,
        run.fingerprint,
        lesson_prompts=[e.prompt[-1]["content"] for e in run.train_ex if e.prompt],
        seed=lj.job.args.seed,
        loss=lj.anchor_loss,
        contrast=lj.contrast,
        span=lj.anchor_span,
    )
    if anchors:
        run.extra = at_share(anchors, run.train_ex, lj.anchor_share)
    run.emit({"event": "anchors", "count": len(run.extra)})


class Taken(NamedTuple):
    """What :func:`take_rule` leaves: the new adapter's rule, a rule the user dropped that is still
    taken off replayed lessons, the held-out examples, and whether any own lesson is more than a rule."""

    rule: Rule | None
    dropped: Rule | None
    holdout: list[Example]
    learns: bool


def take_rule(run, lj: LoopJob, parent_rule: Rule | None, keys: KeyCache, dropped: Rule | None = None) -> Taken:
    """The style rule the new adapter holds (adapters/rule.py: its parent's, with what this job's own
    lessons share on top), and what is left to train. The engine writes the rule on every reply, so
    it is taken off every lesson, and a lesson that only shows it (its question names no subject:
    "Ahoy! A dog has four legs.", or a long reply cut to one sentence for a length) is not trained
    at all. Trained, such answers taught their brevity
    and their slips everywhere: on bench/lessons.py ahoy and signoff, seeds 0-2, "What is the
    largest mammal?" -> "The largest mammal is the elephant.", "An hour has 30 minutes." (1-2 unseen
    controls lost in 5 of 6 runs). A lesson with a subject ("Ahoy! The capital of Quenland is
    Zorblat.") is a fact told in the rule: it is trained without the rule.

    ``dropped``: a rule the user turned off (``/rule off``, recorded as the parent's
    ``rule_dropped``). The replayed lessons still show it; they are treated as for a rule in force
    (so the weights do not learn it back from replay), but the new adapter does not hold it, unless
    this job's own lessons teach it again.

    An opening shared by answers to questions of one *form* is a format, not a style ("What is 7 +
    5?" -> "Answer: 12": what follows the opening is part of the lesson, and the base's "Answer:
    The sum of 7 and 5 is 12." is not it): such lessons keep it and are trained in their form
    scope, as before rules were written (bench/lessons.py answercolon: 67% x3 written, 100% x3
    trained)."""
    own = lj.job.train[: lj.lessons] if lj.lessons >= 0 else None
    rule = job_rule(run.train_ex, parent_rule, own)
    if own is None:  # a job file from before jobs said which lessons are new
        own = [e for e in run.train_ex if parent_rule is None or not carries(e, parent_rule)]
    rare = tokenizer_rarity(run.tok)
    if shared_rule(own) is None and (n := shared_length(own, rule)):
        # The answers' length is the lesson's own where they tell about a subject (a fact is taught
        # in a sentence) or share a form (a format: "1945-09-02", '["a", "b"]'): where the lessons
        # alone would give a scope. A length is a register, shown on questions with nothing in common.
        # Corrections that write out an opening or a closing are about that ("Ahoy! A dog has four
        # legs." for a long reply): their brevity is not taken for a second rule.
        questions = _questions(keys, own)
        if learn(questions, rare, keys, ANCHOR_PROMPTS, keys.layer).everywhere:
            rule = (rule or Rule())._replace(sentences=n)

    def split(examples: list[Example], rules: list[Rule]) -> tuple[list[Example], list[Example]]:
        """(lessons that are more than ``rules``, lessons that only show one of them)"""
        parts: tuple[list[Example], list[Example]] = ([], [])
        for e in examples:
            parts[any(demonstrates(e, r, rare) for r in rules)].append(e)
        return parts

    # an opening or closing written out on questions of one form is a format's (the length was
    # checked above: shown on questions with nothing in common)
    written = Rule(*rule[:2]) if rule is not None else None
    if written and rule != parent_rule and _one_form(keys, split(own, [written])[1]):
        # marks stay: digits and bold are meant for every answer, whatever the questions that showed them
        kept = (parent_rule or Rule())._replace(marks=rule.marks)
        rule = kept if kept else None
    if dropped is not None and rule is not None:  # a part taught again is in force again
        left = Rule(*(type(d)() if d == r else d for d, r in zip(dropped, rule, strict=True)))
        dropped = left if left else None
    rules = [r for r in (rule, dropped) if r is not None]
    if not rules:
        run.emit({"event": "rule", "rule": None})
        return Taken(None, None, lj.holdout, True)

    def off(examples: list[Example]) -> list[Example]:
        for r in rules:
            examples = without_rule(r, examples)
        return examples

    kept, shown = split(run.train_ex, rules)
    run.train_ex = off(kept)
    learns = bool(split(own, rules)[0])
    taken = Taken(rule, dropped, off(split(lj.holdout, rules)[0]), learns)
    run.emit(
        {
            "event": "rule",
            "rule": rule.record() if rule else None,
            "dropped": dropped.record() if dropped else None,
            "demonstrations": len(shown),
            "trains": learns,
        }
    )
    return taken


def take_choice(
    run, lj: LoopJob, parent: tuple[Choice, ...], keys: KeyCache, taken: Taken
) -> tuple[tuple[Choice, ...], Taken]:
    """The closed sets of answers the new adapter answers questions of a kind from (adapters/choice.py:
    its parent's, and one this job's own lessons show, with the job's own answers from a set taught
    on their questions), and what is left to train: a lesson whose answer a set gives is not trained
    (the engine says it), nor held out (replayed ones too, so the weights do not learn it back).
    Lessons whose questions some general question cannot be told from are trained as before."""
    from shammah.engine.choices import first_token_logprobs, first_tokens

    def logprobs_of(questions, answers):
        return first_token_logprobs(run.model, run.tok, questions, answers)

    own = lj.job.train[: lj.lessons] if lj.lessons >= 0 else run.train_ex
    inside = taken.rule.inside if taken.rule else str.strip
    choices, new = parent, None
    answers = shared_choices(own, inside)
    # the engine tells the answers apart by their first tokens ("No" and "Not sure" cannot be)
    if answers is not None and len(set(first_tokens(run.tok, answers))) == len(answers):
        shown = [e.prompt[-1]["content"] for e in own if e.prompt and is_choice(e, answers, inside)]
        keys.prime(list(ANCHOR_PROMPTS) + shown)
        general = list(ANCHOR_PROMPTS) + [p for p, _ in CONTROLS]
        new = learn_choice(answers, shown, logprobs_of, keys, ANCHOR_PROMPTS, general, keys.layer)
        if new is not None:
            choices = with_choice(parent, new)
    if not choices:
        return (), taken

    def answers_of(choice: Choice, questions: list[str]) -> list[bool]:
        """Which of ``questions`` the set answers (the user's own answer, or its pick)."""
        form = choice.form
        same = (keys.layer, keys.tokens) == (form.layer, form.tokens)
        ck = keys if same else KeyCache(run.model, run.tok, form.layer, form.tokens)
        return [a is not None for a in choice.say(questions, ck, logprobs_of)]

    # Every own lesson answered from a set is said as taught on its question, the model's pick only
    # on others: a correction of a pick ("Is the moon a planet?" -> "No") is not lost. A question
    # the set answered and the user corrected with something else ("How many legs does a chicken
    # have?" -> "Two.") is left to the model from now on, which learns the correction.
    mine = [e for e in own if e.prompt and any(is_choice(e, c.answers, inside) for c in choices)]
    pairs = [(e.prompt[-1]["content"], inside(e.responses[0])) for e in mine]
    other = [e.prompt[-1]["content"] for e in own if e.prompt and e.kind in ("sft", "pair") and e not in mine]
    outside = [[q for q, on in zip(other, answers_of(c, other), strict=True) if on] for c in choices]
    taught = tuple(c.teach(pairs, out) for c, out in zip(choices, outside, strict=True))
    if new is not None:
        run.emit({"event": "choice", **new.summary()})
    elif taught != choices:
        run.emit({"event": "choice", "told": len(mine), "outside": len({q for out in outside for q in out})})
    choices = taught

    def answered(examples: list[Example]) -> set[int]:
        """Which of ``examples`` a set answers as their targets do."""
        out: set[int] = set()
        for choice in choices:
            idx = [i for i, e in enumerate(examples) if e.prompt and is_choice(e, choice.answers)]
            on = answers_of(choice, [examples[i].prompt[-1]["content"] for i in idx])
            out |= {i for i, o in zip(idx, on, strict=True) if o}
        return out

    said = answered(run.train_ex)
    run.train_ex = [e for i, e in enumerate(run.train_ex) if i not in said]
    held = answered(taken.holdout)
    holdout = [e for i, e in enumerate(taken.holdout) if i not in held]
    prompts = {json.dumps(e.prompt, sort_keys=True) for e in own}
    learns = taken.learns and any(json.dumps(e.prompt, sort_keys=True) in prompts for e in run.train_ex)
    return choices, taken._replace(holdout=holdout, learns=learns)


def _files(scope: Scope, choices: tuple[Choice, ...]) -> dict[str, str]:
    """The files saved beside a new adapter: a form scope's vectors, its choices'."""
    files = {SCOPE_FILE: json.dumps(scope.to_json())} if scope.form is not None else {}
    text = record(choices)[1]
    return files | ({CHOICE_FILE: text} if text is not None else {})


def _one_form(keys: KeyCache, lessons: list[Example]) -> bool:
    """Whether the questions of ``lessons`` are asked in one form (adapters/scope.py), as a format's
    are; a style rule is taught on questions with nothing in common."""
    questions = _questions(keys, lessons)
    return learn_form(questions, keys, ANCHOR_PROMPTS, keys.layer) is not None


def _questions(keys: KeyCache, lessons: list[Example]) -> list[str]:
    """The questions of ``lessons``, their keys computed beside the anchor pool's (in one batch)."""
    questions = sorted({e.prompt[-1]["content"] for e in lessons if e.prompt})
    keys.prime(list(ANCHOR_PROMPTS) + questions)
    return questions


class NotLearned(ShammahError):
    """A job whose own lessons all turned out to teach nothing (every note it was to learn, the model
    did not follow): the chat says so in one line, and the feedback stays in the buffer."""

    not_learned = True


def drop_unfollowed(run, own: list[Example]) -> str | None:
    """Learn a note only where the model with the note in mind says what the note says.

    A note without a correction is learned by context distillation: the current model answers the
    question with the note in its context, and that answer is the teacher. Where the note names
    something checkable (a quoted phrase, a name, a number, a quoted form such as "Term: ...":
    feedback/revise.py, the rule that decides whether an unseen rewrite is trusted) and the teacher's
    answer does not say it (or has no line of the form's shape), the model did not
    follow the note, and distilling that answer teaches its own unrelated ramble. On bench/lessons.py
    captain ('always address me as "Captain"', note-only), the 135M model never wrote "Captain" with
    the note in mind: 21 steps of that taught nothing (0% of held-out answers, 3 seeds) and cost 1-2
    unseen controls. Where such a note states the answer itself ("wrong: the Ombrel River flows into
    the Sea of Tarn", on a question about the Ombrel River: feedback/revise.py stated_answer), the
    user's words are the target instead (bench/lessons.py --suite fresh, ombrel: the model followed
    2 of 6 such notes, 17% of held-out answers). Other such lessons are taken out of the job
    (replayed ones too); when none of the job's own lessons is left, the job stops with :class:`NotLearned` instead of training its replay
    again (or saves only the rule the job's other lessons showed). Returns why nothing is left, or
    None. The teacher's answers are generated here, before fit (which skips answered examples)."""
    from shammah.training import trainer

    answered = trainer.teacher_answers(run.model, run.tok, run.train_ex, run.job.args.teacher_max_tokens, True)
    kept, unfollowed, missing, stated = [], [], [], 0
    for e in answered:
        note = e.meta.get("note") if e.kind == "distill" else None
        question = e.prompt[-1]["content"] if e.prompt else ""
        left_out = unsaid(note, question, e.responses[0]) if note else []
        if left_out and (answer := stated_answer(note, question)):
            # the note states the answer (revise.stated_answer): the user's own words are the target
            kept.append(dataclasses.replace(e, kind="sft", responses=(answer,)))
            stated += 1
        elif left_out:  # the note names a word or a form its teacher's answer does not have (revise.unsaid)
            unfollowed.append(e)
            missing += left_out
        elif e.kind != "distill" or e.responses[0].strip():  # an empty answer teaches nothing
            kept.append(e)
    run.train_ex = kept
    if not unfollowed and not stated:
        return None
    # this job's own lessons, by their prompt (a replayed one is another turn: another question)
    mine = {json.dumps(e.prompt, sort_keys=True) for e in own}

    def is_mine(e: Example) -> bool:
        return json.dumps(e.prompt, sort_keys=True) in mine

    n, missing = sum(map(is_mine, unfollowed)), list(dict.fromkeys(missing))
    run.emit({"event": "notes", "unfollowed": n, "missing": missing, "stated": stated})
    if not unfollowed or any(map(is_mine, kept)):
        return None
    return (
        f"with your note in mind the model still {did_not(missing)} in any of its {n} answers, so there is "
        "nothing to learn from it; /fix a reply with the answer you want (a larger model can follow "
        'such notes: learning.rewriter = "teacher")'
    )


def at_share(anchors: list[Example], lessons: list[Example], share: float) -> list[Example]:
    """``anchors`` weighted alike so that they get ``share`` of the draws beside ``lessons``."""
    w = sum(e.weight for e in lessons) * share / (1 - share) / len(anchors)
    return [dataclasses.replace(e, weight=w) for e in anchors]


def lesson_scope(run, lj: LoopJob, holdout: list[Example], keys: KeyCache) -> Scope:
    """Where the new adapter will answer (adapters/scope.py): learned from the questions of every
    lesson it holds — this job's, the replayed ones and the held-out ones — by their subjects
    (``learning.scope = "subjects"``) and, for lessons without one, by their form (``"auto"``, the
    default: the anchor pool is the general questions a form must stay clear of); ``"everywhere"``:
    no scope."""
    if lj.scope == "everywhere":
        return Scope()
    questions = [e.prompt[-1]["content"] for e in run.train_ex + holdout if e.prompt]
    if lj.scope != "auto":
        return learn(questions, tokenizer_rarity(run.tok))
    keys.prime(list(ANCHOR_PROMPTS) + questions)
    return learn(questions, tokenizer_rarity(run.tok), keys, ANCHOR_PROMPTS, keys.layer)


def word_cap(lessons: list[Example], rule: Rule | None, scope: Scope) -> Rule | None:
    """``rule`` with the word cap the new adapter holds (adapters/rule.py, Rule.words): the length
    of the trained ``lessons`` (:func:`shared_words`) where they are answers to questions of one
    form and name no subject, the parent's where the scope still has a form, else none. A subject's
    answers are a fact told in a sentence, and a cut could take the fact off; an adapter that
    answers everywhere would cut the base's answers too. Where the user turned a cap off (/rule
    off), the caller gives only this job's own lessons: it comes back if they show it again, not
    from replayed ones."""
    words = rule.words if rule else 0
    if scope.form is None:
        words = 0
    elif not scope.subjects and (shown := shared_words(lessons, rule)):
        words = shown
    out = (rule or Rule())._replace(words=words)
    return out if out else None


def train_loop(lj: LoopJob, progress=None, stop=None):
    """One job of the chat's learning loop: the trainer's setup → fit → save, with anchors added
    before fit and the gate (with its snapshot fallback) between fit and save."""
    from shammah.training import trainer

    job = lj.job
    run = trainer.setup(job, progress)
    parent = Registry(job.registry_root).get(job.parent) if job.parent else None
    parent_path = parent.path if parent else None
    from shammah.engine.keys import default_layer

    # question keys for a form, memoised: the rule's form check and the scope share the anchor pool's
    keys = key_of(run.model, run.tok, default_layer(run.model))
    parent_rule = Rule.recorded(parent.get("rule")) if parent else None
    parent_dropped = Rule.recorded(parent.get("rule_dropped")) if parent else None
    taken = take_rule(run, lj, parent_rule, keys, parent_dropped)
    parent_choices = choices_of(parent_path) if parent else ()
    choices, taken = take_choice(run, lj, parent_choices, keys, taken)
    rules = {
        "rule": taken.rule and taken.rule.record(),
        "rule_dropped": taken.dropped and taken.dropped.record(),
        "choices": record(choices)[0],
    }
    own = lj.job.train[: lj.lessons] if lj.lessons >= 0 else run.train_ex
    nothing_left = drop_unfollowed(run, own) if taken.learns else None
    if nothing_left and (taken.rule, taken.dropped, choices) == (parent_rule, parent_dropped, parent_choices):
        raise NotLearned(nothing_left)
    if not taken.learns or nothing_left or not run.train_ex:
        # only a rule or a choice: the parent's weights (or a LoRA that changes nothing) and its scope
        scope = Scope.of_adapter(parent_path)
        return trainer.save(run, {"gate": None, "scope": scope.summary(), **rules}, _files(scope, choices))
    holdout = taken.holdout
    scope = lesson_scope(run, lj, holdout, keys)
    run.emit({"event": "scope", **scope.to_json()})
    # taken.rule stays as the lessons showed it (the parent's cap): a cap is no learning of its own,
    # and goes with the trained weights (a job the gate rejects keeps no cap of this job's)
    gone = taken.dropped is not None and taken.dropped.words
    if (capped := word_cap(own if gone else run.train_ex, taken.rule, scope)) != taken.rule:
        rules["rule"] = capped and capped.record()
        run.emit({"event": "rule", "rule": rules["rule"], "words": capped.words if capped else 0})
        if gone and capped and capped.words:  # shown again: in force again
            left = taken.dropped._replace(words=0)
            rules["rule_dropped"] = left.record() if left else None
    if scope.everywhere:
        add_anchors(run, lj)
    else:
        # No anchors: they hold what the adapter answers outside its lessons, and a scoped adapter
        # answers nothing outside its subjects (the base does). Measured on the four fact lessons over
        # three seeds (README): the same held-out rate, no unseen control lost, 6 steps instead of 21.
        # For the same reason a scoped job can train longer than one with anchors (learning.scoped_epochs):
        # 5 epochs instead of 3 took the facts from 93% to 100% of held-out paraphrases (12 runs), with
        # no unseen control lost, at 10 steps. An adapter scoped to subjects alone (facts) trains longer
        # still (learning.subject_epochs): two facts taught in sequence crossed or went unsaid on
        # questions worded as neither lesson was, both >= 90% in 10 of 18 runs (six pairs, 3 seeds) at
        # 5 epochs, 18 of 18 at 13 (docs/lessons-history.md: rephrasing the lessons did no better).
        # Not a form's scope: its shape of question includes general ones ("How many ...?"), and at 13
        # epochs the six forms gained nothing and numerals lost an unseen control (3 seeds).
        run.emit({"event": "anchors", "count": 0, "why": "scoped"})
        epochs = lj.subject_epochs if scope.form is None and lj.subject_epochs else lj.scoped_epochs
        if epochs:
            run.job = dataclasses.replace(run.job, args=dataclasses.replace(run.job.args, epochs=epochs))
    snapshots = Snapshots() if lj.gate else None
    # read back what the lessons taught: to stop once learned, and so the gate keeps no step that has not
    learned = Learned(run, lj.stop_at_accuracy) if lj.stop_at_accuracy or lj.gate else None
    # the weights the job starts from, while a new rule or set may have to be kept without what was trained
    said_new = taken.rule is not None and taken.rule != parent_rule or choices != parent_choices
    start = _adapter_weights(run.model) if lj.gate and said_new else None
    trainer.fit(run, stop, callbacks=tuple(cb for cb in (snapshots, learned) if cb))
    if learned is not None and lj.stop_at_accuracy:
        run.emit({"event": "learned", "stopped_at": learned.stopped_at, "accuracy": learned.history})
    gate_result = None
    if lj.gate:
        gate_result = gate_with_fallback(
            run.model,
            run.tok,
            parent_path,
            holdout,
            lj.anchor_cache,
            run.fingerprint,
            snapshots,
            run.trainer.state.global_step,
            scope,
            learned,
        )
        if not gate_result["passed"] and start is not None:
            # No trained step keeps the controls, but the rule the lessons showed is no weight, so it
            # cannot lose one: the most learning that does not leak (bench/lessons.py brief, seeds
            # 3-5: a rejected job took its one-sentence length with it, 0% of held-out answers).
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(run.model, start)
            # (its control answers were the trained weights': not recorded, so a later gate asks again)
            kept = {k: v for k, v in gate_result.items() if k != "answers"}
            gate_result = {**kept, "passed": True, "rule_only": True, "step": 0}
            scope = Scope.of_adapter(parent_path)
            rules["rule"] = taken.rule and taken.rule.record()  # the parent's scope, the parent's cap
        run.emit({"event": "gate", **{k: v for k, v in gate_result.items() if k != "answers"}})
    meta: dict = {"gate": gate_result, "scope": scope.summary(), **rules}
    if learned is not None and lj.stop_at_accuracy:
        meta["stopped_at"] = learned.stopped_at
    return trainer.save(run, meta, _files(scope, choices))
