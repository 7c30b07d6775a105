"""Named trainings: ``shammah pipeline <name> [stage]``.

A named training lives in a project directory of its own::

    schemas/<name>.yaml                    the task (pipeline.schema)
    training/data/<name>/                  progress.jsonl, report.json, train.jsonl,
                                           train_val.jsonl (evaluation only), pref_inputs.jsonl,
                                           preferences.jsonl
    training/models/<name>/                state.json, sft/ and dpo/ (PEFT), gguf/, eval.json

Stages, in order, each runnable alone: generate → sft → preferences → dpo → quantize → eval.
``all`` runs the ones not done yet, so a pipeline stopped anywhere goes on where it stopped
(generation itself resumes mid-way from its progress file). The adapters are also registered
as ``<name>-sft`` and ``<name>-dpo``, so the chat and the server can answer with them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from shammah.config import Config
from shammah.errors import ShammahError
from shammah.paths import Paths, atomic_write
from shammah.pipeline import generate as gen
from shammah.pipeline.schema import Schema, check_output, load
from shammah.pipeline.teacher import Teacher, parse_json

STAGES = ("generate", "sft", "preferences", "dpo", "quantize", "eval")


class PipelineError(ShammahError):
    pass


@dataclass(frozen=True)
class Layout:
    root: Path
    name: str

    @property
    def schema(self) -> Path:
        return self.root / "schemas" / f"{self.name}.yaml"

    @property
    def data(self) -> Path:
        return self.root / "training" / "data" / self.name

    @property
    def models(self) -> Path:
        return self.root / "training" / "models" / self.name

    @property
    def state_file(self) -> Path:
        return self.models / "state.json"


class Pipeline:
    def __init__(self, layout: Layout, cfg: Config, paths: Paths, teacher: Teacher | None = None, say=print):
        from shammah.adapters.registry import check_name

        check_name(f"{layout.name}-sft")  # the name must make a valid adapter name
        self.layout, self.cfg, self.paths, self.say = layout, cfg, paths, say
        self.schema: Schema = load(layout.schema)
        self._teacher = teacher
        self.state = json.loads(layout.state_file.read_text()) if layout.state_file.is_file() else {"done": {}}

    # plumbing -------------------------------------------------------------------------------------
    @property
    def teacher(self) -> Teacher:
        if self._teacher is None:
            self._teacher = Teacher.from_config(self.cfg.pipeline)
        return self._teacher

    def _done(self, stage: str, **info) -> None:
        self.state["done"][stage] = {"at": time.time(), **info}
        self.layout.models.mkdir(parents=True, exist_ok=True)
        atomic_write(self.layout.state_file, json.dumps(self.state, indent=2))

    def _need(self, path: Path, stage: str) -> Path:
        if not path.is_file():
            raise PipelineError(f"{path} is missing: run `shammah pipeline {self.layout.name} {stage}` first")
        return path

    def _registry(self):
        from shammah.adapters.registry import Registry

        return Registry(self.paths.adapters)

    # running ----------------------------------------------------------------------------------------
    def run(self, stage: str = "all", force: bool = False) -> None:
        if stage == "all":
            if force:
                self.reset()
            for s in STAGES:
                if s in self.state["done"]:
                    self.say(f"[{s}] done already ({self.layout.state_file}); --force redoes everything")
                    continue
                self.run(s)
            return
        if stage not in STAGES:
            raise PipelineError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)} or all")
        self.say(f"[{stage}]")
        getattr(self, f"stage_{stage}")(force)

    def reset(self) -> None:
        shutil.rmtree(self.layout.data, ignore_errors=True)
        shutil.rmtree(self.layout.models, ignore_errors=True)
        reg = self._registry()
        for suffix in ("sft", "dpo"):
            if reg.exists(f"{self.layout.name}-{suffix}"):
                reg.delete(f"{self.layout.name}-{suffix}")
        self.state = {"done": {}}

    # stages ------------------------------------------------------------------------------------------
    def stage_generate(self, force: bool) -> None:
        pc, data = self.cfg.pipeline, self.layout.data
        teacher = self.teacher  # a teacher that cannot be found must not cost the data a --force would clear
        if force:
            shutil.rmtree(data, ignore_errors=True)
        mix = {"positive": pc.mix_positive, "context": pc.mix_context, "negative": pc.mix_negative}
        if sum(mix.values()) <= 0:
            raise PipelineError("pipeline.mix_positive + mix_context + mix_negative must be above 0")
        mix = {k: v / sum(mix.values()) for k, v in mix.items() if v > 0}
        prog = gen.generate(self.schema, teacher, data, pc.examples, pc.batch_size, mix, say=self.say)
        report = gen.finalize(self.schema, prog, data)
        dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
        self.say(f"{report['accepted']} examples ({report['kinds']}); dropped: {dropped}; split {report['split']}")
        if report["accepted"] < pc.examples:
            self.say(f"note: {report['accepted']} of {pc.examples} asked for: the teacher kept failing validation")
        self._done("generate", **{k: report[k] for k in ("accepted", "split")})

    def _train(self, name: str, method: str, data: list, epochs: int, parent: str | None, force: bool):
        from shammah.training.args import build
        from shammah.training.data import dataset_hash
        from shammah.training.job import TrainJob
        from shammah.training.progress import TerminalProgress
        from shammah.training.trainer import train

        reg = self._registry()
        if reg.exists(name):
            if not force and self.state["done"].get(method):
                return reg.get(name)
            reg.delete(name)
        job = TrainJob(
            base=self.cfg.model.base,
            cache_dir=self.paths.cache,
            registry_root=self.paths.adapters,
            checkpoints_root=self.paths.root / "checkpoints",
            train=data,
            args=build(
                ("pipeline", {"method": method, "epochs": epochs, "learning_rate": self.cfg.pipeline.learning_rate})
            ),
            name=name,
            parent=parent,
            dataset_hash=dataset_hash(data),
            meta={"pipeline": self.layout.name},
        )
        with TerminalProgress() as bar:
            info = train(job, bar).adapter
        from shammah.adapters.export import export_adapter

        target = self.layout.models / method
        shutil.rmtree(target, ignore_errors=True)
        export_adapter(info, target)
        return info

    def stage_sft(self, force: bool) -> None:
        from shammah.training.data import load_jsonl

        data = load_jsonl(self._need(self.layout.data / "train.jsonl", "generate"))
        info = self._train(f"{self.layout.name}-sft", "sft", data, self.cfg.pipeline.sft_epochs, None, force)
        self.say(
            f"adapter {info.name} (final loss {info.get('report', 'final_train_loss')}) in {self.layout.models / 'sft'}"
        )
        self._done("sft", adapter=info.name)

    def _evaluator(self, max_new_tokens: int = 256):
        from shammah import evaluate
        from shammah.engine.loader import local_dir

        _, base_dir = local_dir(self.cfg.model.base, self.paths.cache)
        return evaluate.Evaluator(base_dir, self._registry(), max_new_tokens, self.cfg.model.threads)

    def stage_preferences(self, force: bool) -> None:
        """The SFT model's answers to held-out requests beside the teacher's: pairs where they differ."""
        from shammah import evaluate

        self._need_stage("sft")
        inputs = evaluate.load_items(self._need(self.layout.data / "pref_inputs.jsonl", "generate"))
        ev = self._evaluator()
        ev.use(f"{self.layout.name}-sft")
        _, replies = ev.run(inputs, ())
        pairs, agreed, refused = [], 0, 0
        for item, reply in zip(inputs, replies, strict=True):
            system, request = item.messages[0]["content"], item.messages[-1]["content"]
            answer = self.teacher.ask(
                "You answer requests for a command-line tool with one JSON object, nothing else.",
                f"{system}\n\nRequest:\n{request}\n\nThe ideal answer (one JSON object):",
                temperature=0.0,
            )
            try:
                ideal = parse_json(answer)
            except ValueError:
                refused += 1
                continue
            if check_output(self.schema, ideal) is not None:
                refused += 1  # the teacher's own answer breaks the schema: no lesson to take from it
                continue
            try:
                same = json.loads(reply) == ideal
            except ValueError:
                same = False
            if same:
                agreed += 1
                continue
            chosen = json.dumps(ideal, ensure_ascii=False)
            pairs.append({"system": system, "prompt": request, "chosen": chosen, "rejected": reply})
        atomic_write(
            self.layout.data / "preferences.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        )
        self.say(
            f"{len(pairs)} preference pairs; the SFT model already agreed on {agreed}; {refused} teacher answers dropped"
        )
        self._done("preferences", pairs=len(pairs), agreed=agreed, dropped=refused)

    def _need_stage(self, stage: str) -> None:
        if stage not in self.state["done"]:
            raise PipelineError(f"the {stage} stage has not run: `shammah pipeline {self.layout.name} {stage}` first")

    def stage_dpo(self, force: bool) -> None:
        from shammah.training.data import load_jsonl

        self._need_stage("sft")
        path = self._need(self.layout.data / "preferences.jsonl", "preferences")
        if not path.read_text().strip():
            self.say("no preference pairs: the SFT model agrees with the teacher on every held-out request; no DPO")
            self._done("dpo", adapter=None)
            return
        pairs = load_jsonl(path)
        name = f"{self.layout.name}-dpo"
        info = self._train(name, "dpo", pairs, self.cfg.pipeline.dpo_epochs, f"{self.layout.name}-sft", force)
        self.say(f"adapter {info.name} in {self.layout.models / 'dpo'}")
        self._done("dpo", adapter=info.name)

    def _final(self) -> str:
        self._need_stage("sft")
        return (self.state["done"].get("dpo") or {}).get("adapter") or f"{self.layout.name}-sft"

    def stage_quantize(self, force: bool) -> None:
        from shammah.adapters import export
        from shammah.engine.loader import local_dir

        name = self._final()
        _, base_dir = local_dir(self.cfg.model.base, self.paths.cache)
        info = self._registry().get(name)
        model, tok = export.merged_model(info, base_dir)
        target = self.layout.models / "gguf" / f"{name}-{self.cfg.pipeline.gguf_type}.gguf"
        if target.exists():
            target.unlink()
        export.write_gguf(model, tok, target, self.cfg.pipeline.gguf_type, name=name)
        self.say(f"wrote {target}")
        self._done("quantize", gguf=str(target))

    def stage_eval(self, force: bool) -> None:
        from shammah import evaluate

        items = evaluate.load_items(self._need(self.layout.data / "train_val.jsonl", "generate"))
        metrics = ("exact", "json", "fields", "latency", "perplexity")
        targets = ["base", f"{self.layout.name}-sft"]
        if (self.state["done"].get("dpo") or {}).get("adapter"):
            targets.append(self.state["done"]["dpo"]["adapter"])
        ev = self._evaluator()
        results = {}
        for t in targets:
            ev.use(t)
            results[t], _ = ev.run(items, metrics)
        atomic_write(
            self.layout.models / "eval.json", json.dumps({"examples": len(items), "results": results}, indent=2)
        )
        self.results = results
        self._done("eval", examples=len(items))


def table(results: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    metrics = list(next(iter(results.values())))
    return ("model", *metrics), [(t, *(f"{r[m]:g}" for m in metrics)) for t, r in results.items()]
