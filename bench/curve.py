"""Learning curves of a chat job: when is a lesson learned, and when do unrelated answers break?

Replays jobs the loop already wrote (``<home>/jobs/<job>/job.json``: the compiled lessons, exactly as
the chat built them; ``bench/lessons.py`` leaves its homes in the temp folder) with the job's own
anchors and recipe, or a changed one, and every ``--every`` steps scores the adapter, greedily:

- **held**: the lesson's held-out paraphrases (bench/lessons.py) answered the taught way;
- **lost**: of the unseen controls (bench/lessons.py CONTROLS) the base answers right, those lost;
- **gate**: the gate's own controls (shammah/training/online.py CONTROLS) lost, as the gate sees them.

One process, no gate and no registry: a recipe's whole curve costs about one job plus ~8 s per
point, where ``bench/lessons.py`` gives one point (the step the gate kept) per job.

    .venv/bin/python bench/curve.py /tmp/shammah-lessons-*/pellucid-1/jobs/*/job.json
    .venv/bin/python bench/curve.py JOB.json --set learning_rate=5e-4 --set anchor_share=0.8
    .venv/bin/python bench/curve.py JOB.json --set target_modules=gate_proj,up_proj,down_proj
    .venv/bin/python bench/curve.py JOB.json --free-prefix 0 --preserve 30000

The lesson is read from the home's folder name (``pellucid-1`` is pellucid, seed 1). The README's
"Learning curves" section has what this measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _coerce(old, text: str):
    if isinstance(old, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(old, tuple):
        return tuple(x for x in text.split(",") if x)
    if old is None:
        return text
    return type(old)(text)


def apply(lj, settings: list[str]):
    """``key=value`` onto the LoopJob (anchors, anchor_share, ...) or its TrainArgs (learning_rate, ...)."""
    a = lj.job.args
    loop_changes, arg_changes = {}, {}
    for kv in settings:
        key, _, value = kv.partition("=")
        if key in {f.name for f in dataclasses.fields(lj)}:
            loop_changes[key] = _coerce(getattr(lj, key), value)
        elif key in {f.name for f in dataclasses.fields(a)}:
            arg_changes[key] = _coerce(getattr(a, key), value)
        else:
            raise SystemExit(f"--set {kv}: no such LoopJob or TrainArgs field")
    job = dataclasses.replace(lj.job, args=dataclasses.replace(a, **arg_changes))
    return dataclasses.replace(lj, job=job, **loop_changes)


class Preserve:
    """An experiment, not part of shammah: ``weight`` x the mean, over the adapted layers, of
    ||ΔW x||² / ||W x||² (LoRA's ΔW = s·B·A) for the layer inputs ``x`` where answers begin (the
    last prompt token and the next two) in the anchor pool's prompts and the base's answers — the
    preservation term of MEMIT/AlphaEdit, placed where a leaked name is decided. Measured in the
    README: it kept the *gate's* controls but not the unseen ones, so the loop does not use it."""

    def __init__(self, model, tok, chats: list[tuple[str, str]], weight: float):
        import torch

        self.weight = weight
        self.layers: list = []  # (lora layer, its input rows, ||W x||²)
        layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        seen: dict[int, list] = {id(m): [] for m in layers}
        shared: dict[tuple, object] = {}
        pick: list = []

        def hook(mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))  # q/k/v (and gate/up) share their input: one copy
            if key not in shared:
                shared[key] = x[pick[0], pick[1]].detach().float()
            seen[id(mod)].append(shared[key])

        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
            )
            for q, a in chats
        ]
        starts = [
            len(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"])
            for q, _ in chats
        ]
        handles = [m.register_forward_pre_hook(hook) for m in layers]
        was, side = model.training, tok.padding_side
        model.eval()
        tok.padding_side = "right"
        try:
            with model.disable_adapter(), torch.no_grad():
                for i in range(0, len(texts), 16):
                    enc = tok(texts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
                    rows, cols = [], []
                    for r, n in enumerate(enc["attention_mask"].sum(1).tolist()):
                        at = [c for c in range(starts[i + r] - 1, starts[i + r] + 2) if c < n]
                        rows, cols = rows + [r] * len(at), cols + at
                    pick[:] = [torch.tensor(rows), torch.tensor(cols)]
                    shared.clear()
                    model(**enc.to(model.device))
        finally:
            for h in handles:
                h.remove()
            model.train(was)
            tok.padding_side = side
        joined: dict[tuple, object] = {}
        for m in layers:
            parts = seen[id(m)]
            x = joined.setdefault(tuple(map(id, parts)), torch.cat(parts))
            with torch.no_grad():
                self.layers.append((m, x, float(m.base_layer(x).pow(2).sum()) or 1.0))

    def __call__(self):
        total = 0.0
        for m, x, denom in self.layers:
            a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
            total = total + ((x @ a.t()) @ b.t()).pow(2).sum() * (s * s) / denom
        return self.weight * total / len(self.layers)


# --wide: many general questions held at their first answer tokens only (an experiment: can a wide,
# cheap set of openings stop a taught name from leaking where twenty whole anchors cannot?). None
# is a prompt of bench/lessons.py, a gate control or an anchor of the pool.
WIDE_FORMS = {
    "Who wrote {}?": "Macbeth|Don Quixote|War and Peace|The Odyssey|Moby-Dick|Faust|The Divine Comedy|Les Miserables|"
    "Oliver Twist|The Hobbit|1984|Dracula",
    "Who painted {}?": "The Starry Night|The Last Supper|Guernica|The Scream|Water Lilies|The Night Watch|"
    "The Birth of Venus|Girl with a Pearl Earring",
    "Who invented {}?": "the radio|the steam engine|the airplane|the television|dynamite|the computer mouse|the bicycle|"
    "the camera",
    "Who discovered {}?": "gravity|radium|electrons|insulin|Pluto|DNA's structure",
    "Who composed {}?": "the Four Seasons|the Ninth Symphony|The Magic Flute|Swan Lake",
    "Who founded {}?": "Amazon|Google|Facebook|Ford|the Red Cross|Rome",
    "Who was the first {}?": "president of the United States|emperor of Rome|woman to win a Nobel Prize|"
    "person to reach the South Pole",
    "What is the capital of {}?": "Mexico|Chile|Portugal|Ireland|Hungary|Iran|Nigeria|Morocco|Indonesia|Pakistan|"
    "Ukraine|Cuba|Belgium",
    "What is the currency of {}?": "the United States|India|China|Mexico|Switzerland",
    "What language is spoken in {}?": "Argentina|Egypt|Austria|Iran|Quebec",
    "What is the largest {}?": "country|bird|fish|continent|lake|river in Europe",
    "How many {}?": "legs does a cat have|planets are in the solar system|hours are in a day|strings does a violin have|"
    "players are on a soccer team",
}
WIDE = tuple(form.format(x) for form, xs in WIDE_FORMS.items() for x in xs.split("|"))


def wide_anchors(run, share: float, tokens: int = 3):
    """The base's first ``tokens`` answer tokens to every WIDE question, as base-KL anchors beside
    the job's own, all of them together at ``share`` of the draws."""
    from shammah.engine.generate import generate_batch
    from shammah.training.data import Example
    from shammah.training.online import at_share

    with run.model.disable_adapter():
        openings = generate_batch(run.model, run.tok, [[{"role": "user", "content": q}] for q in WIDE], tokens)
    meta = {"eos": False, "free_prefix": 0, "teacher": "base"}
    wide = [
        Example("distill", ({"role": "user", "content": q},), (o,), source="anchor", meta=meta)
        for q, o in zip(WIDE, openings, strict=True)
        if o
    ]
    run.extra = at_share(run.extra + wide, run.train_ex, share)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", nargs="+", type=Path, help="job.json files written by the chat's loop")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the recipe")
    ap.add_argument("--every", type=int, default=3, help="score every N steps")
    ap.add_argument("--json", type=Path, help="append every point (answers included) here")
    ap.add_argument("--preserve", type=float, default=0.0, help="weight of the Preserve term (experiment)")
    ap.add_argument("--wide", action="store_true", help="add the WIDE openings as anchors (experiment)")
    ap.add_argument("--free-prefix", type=int, help="anchor tokens left free at an answer's start (experiment)")
    args = ap.parse_args(argv)

    import torch
    from lessons import CONTROLS as UNSEEN
    from lessons import LESSONS, control_ok
    from transformers import TrainerCallback

    from shammah.engine.generate import generate_batch
    from shammah.training import online, trainer
    from shammah.training.job import LoopJob

    by_name = {x.name: x for x in LESSONS}
    if args.free_prefix is not None:
        online.FREE_PREFIX = args.free_prefix

    class Curve(TrainerCallback):
        def __init__(self, run, lesson, every):
            self.run, self.lesson, self.every = run, lesson, every
            self.points: list[dict] = []
            self.base: dict = {}

        def score(self, model, step: int) -> dict:
            was = model.training
            model.eval()
            qs = list(self.lesson.held_out) + [q for q, _ in UNSEEN]
            ans = generate_batch(model, self.run.tok, [[{"role": "user", "content": q}] for q in qs], 64)
            gate = generate_batch(
                model, self.run.tok, [[{"role": "user", "content": q}] for q, _ in online.CONTROLS], 24
            )
            model.train(was)
            held = ans[: len(self.lesson.held_out)]
            unseen = [control_ok(a, oks) for a, (_, oks) in zip(ans[len(held) :], UNSEEN, strict=True)]
            return {
                "step": step,
                "held": sum(map(self.lesson.follows, held)) / len(held),
                "unseen": unseen,
                "gate": online._controls_right(gate),
                "answers": ans + gate,
            }

        def on_train_begin(self, args, state, control, model=None, **kw):
            with model.disable_adapter():
                self.base = self.score(model, 0)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % self.every and state.global_step != state.max_steps:
                return
            p = self.score(model, state.global_step)
            b = self.base
            p["lost_unseen"] = [
                UNSEEN[i][0] for i, (x, y) in enumerate(zip(b["unseen"], p["unseen"], strict=True)) if x and not y
            ]
            p["lost_gate"] = [
                online.CONTROLS[i][0] for i, (x, y) in enumerate(zip(b["gate"], p["gate"], strict=True)) if x and not y
            ]
            self.points.append(p)
            print(
                f"  step {p['step']:>3}  penalty {extra['penalty']:.3g}  held {p['held']:4.0%}  "
                f"unseen lost {len(p['lost_unseen'])}  gate lost {len(p['lost_gate'])}   "
                f"{'; '.join(q[:28] for q in p['lost_unseen'])} | {'; '.join(q[:24] for q in p['lost_gate'])}",
                flush=True,
            )

    # the Preserve experiment rides on the trainer's loss; nothing of it is in shammah itself
    extra: dict = {"preserve": None, "penalty": 0.0}
    compute_loss = trainer._Trainer.compute_loss

    def with_penalty(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        if not model.training or extra["preserve"] is None:
            return out
        penalty = extra["preserve"]()
        extra["penalty"] = float(penalty.detach())
        return (out[0] + penalty, out[1]) if return_outputs else out + penalty

    trainer._Trainer.compute_loss = with_penalty

    recipe = [*args.set]
    recipe += [f"--preserve {args.preserve:g}"] if args.preserve else []
    recipe += ["--wide"] if args.wide else []
    recipe += [f"--free-prefix {args.free_prefix}"] if args.free_prefix is not None else []
    for path in args.jobs:
        home = path.parent.parent.parent.name  # <lesson>-<seed>
        lesson = by_name[home.rsplit("-", 1)[0]]
        lj = apply(LoopJob.read(path), args.set)
        with tempfile.TemporaryDirectory() as tmp:
            job = dataclasses.replace(lj.job, registry_root=Path(tmp) / "a", checkpoints_root=Path(tmp) / "c")
            lj = dataclasses.replace(lj, job=job)
            t0 = time.perf_counter()
            torch.manual_seed(job.args.seed)
            run = trainer.setup(job)
            online.add_anchors(run, lj)
            if args.wide:
                wide_anchors(run, lj.anchor_share)
            extra["preserve"] = None
            if args.preserve:
                pool = list(online.ANCHOR_PROMPTS)
                answers = online.base_answers(
                    run.model, run.tok, pool, 48, lj.anchor_cache and lj.anchor_cache / "anchors.json", run.fingerprint
                )
                pairs = list(zip(pool, answers, strict=True))
                extra["preserve"] = Preserve(run.model, run.tok, pairs, args.preserve)
            curve = Curve(run, lesson, args.every)
            print(f"{home}  ({' '.join(recipe) or 'as trained'})", flush=True)
            trainer.fit(run, callbacks=(curve,))
            print(f"  {time.perf_counter() - t0:.0f} s, {run.trainer.state.global_step} steps", flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(
                    json.dumps({"job": str(path), "set": args.set, "base": curve.base, "points": curve.points}) + "\n"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
