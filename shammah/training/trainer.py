"""The trainer: ``train(job, progress)`` in three layers — setup, fit, save.

Built on transformers' Trainer (optimizer, schedulers, gradient accumulation,
checkpoint/resume with optimizer + scheduler + RNG state, early stopping,
``accelerate launch``/DDP) and PEFT (adapters). shammah adds: the mixed-kind
objective (``methods``), weighted sampling, NaN detection, progress events and
the atomic write into the registry. Progress is reported only through the
``progress`` callable (JSON-lines in the worker, a list in tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from shammah.adapters.registry import AdapterInfo, Registry
from shammah.engine import loader
from shammah.engine.fingerprint import fingerprint
from shammah.engine.resolve import resolve
from shammah.errors import ShammahError
from shammah.training import methods
from shammah.training.args import TrainArgs
from shammah.training.data import Example, check_method
from shammah.training.job import TrainJob

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
CHECKPOINTING_TOKENS = 1024  # gradient_checkpointing = "auto": on above this many tokens a batch


class TrainingError(ShammahError):
    """Training could not start or had to stop; the message says what to change."""


class Cancelled(TrainingError):
    pass


@dataclass
class TrainResult:
    adapter: AdapterInfo
    report: dict[str, Any]


# --- data ---------------------------------------------------------------------------------
class _Features(Dataset):
    def __init__(self, feats: list[dict]):
        self.feats = feats

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> dict:
        return self.feats[i]


class WeightedSampler(Sampler[int]):
    """Draws indices with probability proportional to each example's weight, with replacement,
    ``len(weights)`` draws per epoch. Seeded by (seed, epoch) so a resumed run sees exactly the
    order an uninterrupted one would have."""

    def __init__(self, weights: list[float], seed: int):
        self.weights = torch.tensor(weights, dtype=torch.double)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.multinomial(self.weights, len(self.weights), replacement=True, generator=g).tolist())


# --- the HF Trainer with our objective ---------------------------------------------------
class _Trainer(Trainer):
    def __init__(self, *a, objective, sample_weights, seed, **kw):
        super().__init__(*a, **kw)
        self.objective = objective
        self.sample_weights = sample_weights
        self.sample_seed = seed
        self.tokens_seen = 0

    def _get_train_sampler(self, train_dataset=None):
        return WeightedSampler(self.sample_weights, self.sample_seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, parts = self.objective(model, inputs)
        if model.training:
            self.tokens_seen += int(inputs["attention_mask"].sum())
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {float(loss.detach())} at step {self.state.global_step + 1}: training diverged. "
                    f"Lower the learning rate (now {self.args.learning_rate:g}) and run again."
                )
        return (loss, parts) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, _ = self.objective(model, inputs)
        return loss.detach(), None, None


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def return_freed_memory() -> None:
    """Make memory a training step frees go back to the OS (Linux, glibc).

    glibc serves large blocks with mmap only below a threshold that rises as blocks are freed
    (up to 32 MB), and keeps freed heap memory for reuse. A step's temporaries — layer
    recomputation, logits, their gradients — then stay resident: a batch of long DPO pairs on the
    135M model held 5.8 GB for 0.2 GB of saved tensors (bench/memory.py). Fixing the threshold
    at 128 KB gives every large tensor its own mapping, unmapped when it is freed; mallopt is
    glibc's own switch for it (the same as MALLOC_MMAP_THRESHOLD_ in the environment). It costs
    time — fresh pages for every large tensor: short lessons' steps took 1.5x as long, for 0.2 GB
    — so only long batches (those that also get gradient checkpointing) turn it on."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give back the top of the heap sooner too
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        log.debug("mallopt unavailable", exc_info=True)


def _peak_rss_mb() -> float:
    """The most this process has held resident so far."""
    try:
        import resource
    except ImportError:  # Windows: psutil knows the peak working set
        import psutil

        mi = psutil.Process().memory_info()
        return getattr(mi, "peak_wset", mi.rss) / 2**20
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


class _ProgressCallback(TrainerCallback):
    def __init__(self, emit: Progress, trainer_ref: list, stop: threading.Event | None):
        self.emit = emit
        self.ref = trainer_ref
        self.stop = stop
        self.t0 = time.perf_counter()
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        self.train_seconds = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        self.start_step = state.global_step
        self.emit(
            {
                "event": "start",
                "total_steps": state.max_steps,
                "epochs": args.num_train_epochs,
                "resumed_from_step": state.global_step,
            }
        )

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" not in logs:
            return
        self.last_loss = float(logs["loss"])
        elapsed = time.perf_counter() - self.t0
        done = max(state.global_step - self.start_step, 1)
        eta = elapsed / done * (state.max_steps - state.global_step)
        ev = {
            "event": "step",
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(float(state.epoch or 0), 3),
            "loss": self.last_loss,
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_s": round(self.ref[0].tokens_seen / elapsed, 1) if elapsed > 0 else 0.0,
            "elapsed_s": round(elapsed, 2),
            "eta_s": round(eta, 1),
            "rss_mb": round(_rss_mb(), 1),
        }
        if torch.cuda.is_available():
            ev["vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.emit(ev)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if metrics and "eval_loss" in metrics:
            self.last_eval = float(metrics["eval_loss"])
            self.emit({"event": "eval", "step": state.global_step, "eval_loss": self.last_eval})

    def on_epoch_end(self, args, state, control, **kw):
        control.should_save = args.save_strategy != "no"  # at every epoch end, besides every save_steps
        if self.ref[0].eval_dataset is not None:
            control.should_evaluate = True

    def on_save(self, args, state, control, **kw):
        self.emit(
            {
                "event": "checkpoint",
                "step": state.global_step,
                "path": str(Path(args.output_dir) / f"checkpoint-{state.global_step}"),
            }
        )

    def on_step_end(self, args, state, control, **kw):
        if self.stop is not None and self.stop.is_set():
            raise Cancelled("training cancelled")


# --- setup -------------------------------------------------------------------------------
def peft_config(a: TrainArgs):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    targets = list(a.target_modules)
    if a.adapter_type in ("lora", "dora", "lorafa"):
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=a.rank,
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            target_modules=targets,
            use_dora=a.adapter_type == "dora",
        )
    if a.adapter_type == "ia3":
        ff = [t for t in targets if t in ("gate_proj", "up_proj", "down_proj", "mlp.fc1", "mlp.fc2")]
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff)
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=a.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )


def pick_train_dtype(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"  # CPU/MPS: full precision trains reliably; bf16 autocast on CPU is slower to converge


def _load_model(job: TrainJob, device: str, dtype: str):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = job.args
    spec = resolve(job.base)
    with loader.LOAD_LOCK:
        path = loader.model_dir(spec, job.cache_dir)
        tok = AutoTokenizer.from_pretrained(path)
        kw: dict[str, Any] = {"dtype": getattr(torch, dtype)}
        if a.quantization == "int4":
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=getattr(torch, dtype),
            )
            kw["device_map"] = {"": 0}
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if a.quantization == "int4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    fp = fingerprint(path)
    if job.parent:
        parent = Registry(job.registry_root).get(job.parent)
        if parent.get("base", "fingerprint") != fp:
            raise TrainingError(
                f"adapter {job.parent!r} was trained on {parent.get('base', 'id')}, not on {spec.name}; "
                "start a fresh adapter (no parent) for this base model"
            )
        model = PeftModel.from_pretrained(model, str(parent.path), is_trainable=True)
    else:
        model = get_peft_model(model, peft_config(a))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, spec, path, fp


def _checkpoint_to_resume(run_dir: Path, resume: bool | str) -> str | None:
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("latest", "true"):
        p = Path(resume)
        if not p.is_dir():
            p = run_dir / resume
        if not (p / "trainer_state.json").is_file():
            raise TrainingError(f"--resume {resume}: no checkpoint there (looked in {p})")
        return str(p)
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    ckpts = [c for c in ckpts if (c / "trainer_state.json").is_file()]
    if not ckpts:
        raise TrainingError(f"--resume: no checkpoint in {run_dir}; run without --resume to start over")
    return str(ckpts[-1])


def teacher_answers(
    model, tok, examples: list[Example], max_new_tokens: int, keep_empty: bool = False
) -> list[Example]:
    """Distillation examples without a completion get the teacher's own greedy answer to the
    teacher prompt (the current model, or the base with the adapter disabled). An empty answer
    teaches nothing: its example is left out (``keep_empty``: kept, for the caller to judge)."""
    todo = [i for i, e in enumerate(examples) if e.kind == "distill" and not e.responses]
    if not todo:
        return examples
    from shammah.engine.generate import generate_batch

    out = list(examples)
    was_training = model.training
    model.eval()
    for who in ("current", "base"):
        idx = [i for i in todo if examples[i].meta.get("teacher", "current") == who]
        if not idx:
            continue
        ctx = model.disable_adapter() if who == "base" else contextlib.nullcontext()
        with ctx:
            for j in range(0, len(idx), 16):
                chunk = idx[j : j + 16]
                chats = [list(examples[i].meta["teacher_prompt"]) for i in chunk]
                for i, text in zip(chunk, generate_batch(model, tok, chats, max_new_tokens), strict=True):
                    out[i] = dataclasses.replace(examples[i], responses=(text,))
    model.train(was_training)
    return [e for e in out if keep_empty or e.kind != "distill" or e.responses[0].strip()]


# --- the run: setup -> fit -> save ------------------------------------------------------------
@dataclass
class Run:
    """One training run between its three stages. The online loop adds ``extra`` examples (anchors)
    and callbacks (snapshots) between setup and fit, and its gate result to ``save``'s metadata."""

    job: TrainJob
    emit: Progress
    events: list[str]
    device: str
    dtype: str
    train_ex: list[Example]
    val_ex: list[Example]
    model: Any
    tok: Any
    spec: Any  # the resolved ModelSpec
    base_path: Path
    fingerprint: str
    resume_from: str | None
    t_start: float
    extra: list[Example] = field(default_factory=list)  # examples besides the job's own (anchors)
    trainer: _Trainer | None = None
    out: Any = None  # TrainOutput
    train_seconds: float = 0.0
    last_loss: float | None = None
    final_eval: float | None = None

    @property
    def run_dir(self) -> Path:
        return self.job.checkpoints_root / self.job.name


def setup(job: TrainJob, progress: Progress | None = None) -> Run:
    """Validate the job, pick device and precision, load the base model with a fresh (or the
    parent's) adapter. Every mistake in the job is reported here, before any training."""
    events: list[str] = []  # also written to train.log beside the adapter

    def emit(event: dict[str, Any]) -> None:
        event = {"time": round(time.time(), 3), **event}
        events.append(json.dumps(event) + "\n")
        if progress is not None:
            progress(event)

    a = job.args
    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = loader.pick_device(a.device)
    if a.quantization == "int4" and device != "cuda":
        raise TrainingError(
            "quantization = 'int4' needs a CUDA GPU (bitsandbytes NF4); this machine has none. "
            "Remove base_model.quantization (or set it to 'none') to train in full precision."
        )
    dtype = pick_train_dtype(a.dtype, device)
    train_ex = methods.as_sft(job.train) if a.method == "sft" else job.train
    val_ex = methods.as_sft(job.val) if a.method == "sft" else job.val
    check_method(train_ex, a.method)
    if not train_ex:
        raise TrainingError("nothing to train on after filtering (undesirable examples are never SFT targets)")
    Registry(job.registry_root).path(job.name)  # validates the name early
    if a.save_steps == 0 and (job.resume or a.early_stopping_patience):
        raise TrainingError(
            "save_steps = 0 keeps no checkpoints, so there is nothing to resume or to pick the best from: "
            "set save_steps, or drop --resume / early_stopping_patience"
        )
    resume_from = _checkpoint_to_resume(job.checkpoints_root / job.name, job.resume)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not the user's concern
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|transformers|torch)\.")
    emit(
        {
            "event": "setup",
            "name": job.name,
            "device": device,
            "dtype": dtype,
            "examples": len(train_ex),
            "validation_examples": len(val_ex),
            "base": job.base,
        }
    )
    torch.manual_seed(a.seed)
    model, tok, spec, base_path, fp = _load_model(job, device, dtype)
    return Run(
        job, emit, events, device, dtype, train_ex, val_ex, model, tok, spec, base_path, fp, resume_from, t_start
    )


def fit(run: Run, stop: threading.Event | None = None, callbacks: tuple = ()) -> None:
    """Teacher answers for distillation, tokenizing, reference log-probs, then transformers'
    Trainer with the mixed-kind objective and weighted sampling."""
    a, model, tok = run.job.args, run.model, run.tok
    n_before = len(run.train_ex)
    run.train_ex = teacher_answers(model, tok, run.train_ex, a.teacher_max_tokens)
    run.val_ex = teacher_answers(model, tok, run.val_ex, a.teacher_max_tokens)
    if not run.train_ex:
        raise TrainingError(
            f"nothing to train on: the teacher gave an empty answer to all {n_before} distillation "
            "prompt(s); give them a 'completion', or use a model that answers the teacher prompts"
        )
    examples = run.train_ex + run.extra  # extra examples (anchors) come with their targets
    train_feats = [methods.tokenize_example(tok, e, a.max_length) for e in examples]
    val_feats = [methods.tokenize_example(tok, e, a.max_length) for e in run.val_ex]
    pad = tok.pad_token_id
    methods.precompute_reference(model, train_feats + val_feats, pad, a.batch_size)

    early = a.early_stopping_patience > 0 and bool(val_feats)
    # Long replies (a rated 2.5k-character answer, a DPO pair of them) made a 135M model's worker
    # hold ~9 GB of activations; recomputing them in the backward pass keeps a job within a laptop.
    longest = max(sum(len(ids) for ids, _ in f["seqs"]) for f in train_feats)
    checkpointing = a.gradient_checkpointing == "on" or (
        a.gradient_checkpointing == "auto" and longest * a.batch_size > CHECKPOINTING_TOKENS
    )
    if checkpointing:  # long batches: their freed temporaries were most of the worker's memory
        return_freed_memory()
    targs = TrainingArguments(
        output_dir=str(run.run_dir),
        num_train_epochs=a.epochs,
        max_steps=a.max_steps or -1,
        per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.learning_rate,
        lr_scheduler_type=a.scheduler,
        warmup_steps=a.warmup_ratio,
        weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 1,
        save_total_limit=a.keep_checkpoints,
        eval_strategy=("steps" if a.save_steps else "epoch") if val_feats else "no",
        eval_steps=a.save_steps if val_feats and a.save_steps else None,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        seed=a.seed,
        data_seed=a.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=run.device == "cpu",
        bf16=run.dtype == "bfloat16" and run.device == "cuda",
        fp16=run.dtype == "float16" and run.device == "cuda",
        optim="adamw_torch",
        save_only_model=False,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
    )
    optimizers = (None, None)
    if a.adapter_type == "lorafa":
        from peft.optimizers import create_lorafa_optimizer

        optimizers = (
            create_lorafa_optimizer(
                model, r=a.rank, lora_alpha=a.alpha, lr=a.learning_rate, weight_decay=a.weight_decay
            ),
            None,
        )
    ref: list = []
    cb = _ProgressCallback(run.emit, ref, stop)
    all_callbacks: list = [cb, *callbacks]
    if early:
        from transformers import EarlyStoppingCallback

        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=a.early_stopping_patience))
    trainer = _Trainer(
        model=model,
        args=targs,
        train_dataset=_Features(train_feats),
        eval_dataset=_Features(val_feats) if val_feats else None,
        data_collator=lambda feats: methods.collate(feats, pad),
        callbacks=all_callbacks,
        optimizers=optimizers,
        objective=methods.Objective(a),
        sample_weights=[e.weight for e in examples],
        seed=a.seed,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; we emit events instead
    ref.append(trainer)
    run.trainer = trainer
    run.out = trainer.train(resume_from_checkpoint=run.resume_from)
    run.train_seconds = time.perf_counter() - cb.t0
    run.last_loss = cb.last_loss
    if val_feats:
        run.final_eval = float(trainer.evaluate()["eval_loss"])


def save(run: Run, meta: dict[str, Any] | None = None, files: dict[str, str] | None = None) -> TrainResult:
    """Write the adapter to a staging directory (with ``files``: name -> text), then one atomic
    rename into the registry: a crash at any point leaves nothing half-written registered."""
    job, a, trainer, model, spec = run.job, run.job.args, run.trainer, run.model, run.spec
    # no trainer: nothing was trained (the online loop's rule-only job), the adapter is as set up
    reg = Registry(job.registry_root)
    staging = reg.stage(job.name)
    try:
        # The adapter names its base by public id (not the private dequantized copy in the cache),
        # in adapter_config.json and in PEFT's model card, so it loads elsewhere as it is.
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = spec.public_id
        model.save_pretrained(staging, safe_serialization=True)
        examples = run.train_ex + run.extra
        state = trainer.state if trainer is not None else None
        loss = run.last_loss if run.last_loss is not None else float(run.out.training_loss) if run.out else None
        report = {
            "steps": state.global_step if state else 0,
            "epochs": float(state.epoch or 0) if state else 0.0,
            "final_train_loss": loss,
            "final_eval_loss": run.final_eval,
            "best_checkpoint": state.best_model_checkpoint if state else None,
            "duration_s": round(time.perf_counter() - run.t_start, 2),
            "device": run.device,
            "dtype": run.dtype,
            "examples": len(run.train_ex),
            "anchors": len(run.extra),
            "validation_examples": len(run.val_ex),
            "kinds": {k: sum(e.kind == k for e in examples) for k in ("sft", "pair", "unpaired", "ranked", "distill")},
            "tokens_per_s": round(trainer.tokens_seen / max(run.train_seconds, 1e-9), 1) if trainer else 0.0,
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "resumed_from": run.resume_from,
        }
        info_meta = {
            "base": {
                "id": spec.public_id,
                "requested": job.base,
                "name": spec.name,
                "fingerprint": run.fingerprint,
                "path": str(run.base_path),
            },
            "method": a.method,
            "adapter_type": a.adapter_type,
            "hyperparameters": a.to_dict(),
            "dataset_hash": job.dataset_hash,
            "parent": job.parent,
            "report": report,
            **(meta or {}),
            **job.meta,
        }
        run.emit({"event": "saved", "adapter": job.name})
        (staging / "train.log").write_text("".join(run.events))
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
        info = reg.commit(staging, job.name, info_meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(run.run_dir, ignore_errors=True)  # the adapter is safe: its checkpoints are no longer needed
    run.emit({"event": "done", "adapter": job.name, "path": str(info.path), **report})
    return TrainResult(info, report)


def train(job: TrainJob, progress: Progress | None = None, stop: threading.Event | None = None) -> TrainResult:
    """The whole run for ``shammah train``: setup, fit, save."""
    run = setup(job, progress)
    fit(run, stop)
    if not run.trainer.is_world_process_zero():  # accelerate/DDP: rank 0 alone writes the adapter
        return TrainResult(None, {})  # type: ignore[arg-type]
    return save(run)
