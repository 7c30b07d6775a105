"""Configuration: frozen dataclasses, one documented line per field.

Every field carries its documentation and its allowed values in ``metadata``;
:func:`load_config` checks a TOML file (and environment overrides) against
them and reports *all* problems together in one :class:`ConfigError`.
``config.example.toml`` mirrors these defaults (a test keeps them in sync).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shammah.errors import ConfigError


def _f(
    default: Any,
    doc: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    auto: bool = False,
) -> Any:
    """A documented field; ``auto=True``: the string "auto" is allowed besides the typed values."""
    return field(default=default, metadata={"doc": doc, "lo": lo, "hi": hi, "choices": choices, "auto": auto})


@dataclass(frozen=True)
class ModelConfig:
    base: str = _f(
        "auto", 'model to chat with: "auto", "embedded", a Hugging Face id, a local directory or a .gguf file'
    )
    device: str = _f("auto", "where to run the model", choices=("auto", "cpu", "cuda", "mps"))
    dtype: str = _f("auto", "weight precision for chat", choices=("auto", "float32", "bfloat16", "float16"))
    threads: int = _f(0, "CPU threads for the model (0 = all cores)", lo=0, hi=1024)
    context_window: int = _f(
        0, "tokens of context kept for a conversation (0 = the model's maximum)", lo=0, hi=1_048_576
    )
    max_new_tokens: int = _f(512, "longest reply, in tokens", lo=1, hi=32768)
    temperature: float = _f(
        "auto",
        'sampling temperature (0 = greedy, deterministic; "auto" = the model\'s generation_config, else 0.2)',
        lo=0.0,
        hi=5.0,
        auto=True,
    )
    top_p: float = _f("auto", 'nucleus sampling mass ("auto" = the model\'s, else 0.9)', lo=0.01, hi=1.0, auto=True)
    top_k: int = _f(
        "auto",
        'sample from the k likeliest tokens (0 = off; "auto" = the model\'s, else 0)',
        lo=0,
        hi=100000,
        auto=True,
    )
    repetition_penalty: float = _f(
        "auto", 'penalty on repeated tokens (1 = off; "auto" = the model\'s, else 1.0)', lo=1.0, hi=3.0, auto=True
    )
    seed: int = _f(-1, "random seed for sampling (-1 = a new one each reply)", lo=-1, hi=2**31 - 1)
    fast_decode: str = _f(
        "auto",
        "fast decode: llamacpp = llama.cpp with the adapter as a GGUF LoRA (needs shammah[llama]); int4/int8 = "
        "packed CPU weights, LoRA unmerged; auto = int4 where the model and torch support it; "
        "off = transformers' generate",
        choices=("auto", "llamacpp", "int4", "int8", "off"),
    )


@dataclass(frozen=True)
class ChatConfig:
    system_prompt: str = _f("", "system prompt for new conversations (empty = the model's own default)")
    history: bool = _f(True, "remember typed input across sessions")


@dataclass(frozen=True)
class FeedbackConfig:
    good_weight: float = _f(1.0, "training weight of a /good rating", lo=0.0, hi=100.0)
    medium_weight: float = _f(3.0, "training weight of a /medium rating", lo=0.0, hi=100.0)
    critical_weight: float = _f(10.0, "training weight of a /critical rating", lo=0.0, hi=100.0)
    fix_weight: float = _f(3.0, "training weight of a /fix given without a rating", lo=0.0, hi=100.0)


@dataclass(frozen=True)
class LearningConfig:
    auto_train: bool = _f(True, "train a new adapter in the background when the buffer reaches the threshold")
    threshold: float = _f(
        30.0, "weighted feedback that triggers training (3 /critical, or 10 /good, ...)", lo=1.0, hi=100000.0
    )
    settle_seconds: float = _f(
        2.0,
        "quiet time after the threshold is reached before training starts (a /fix often follows a /critical)",
        lo=0.0,
        hi=3600.0,
    )
    revise: bool = _f(True, "after /medium or /critical without a fix, rewrite the answer following the note")
    rewriter: str = _f(
        "model",
        "who writes the note-guided rewrite: the chat's own model, or the teacher (pipeline.teacher_url: a larger"
        " model behind any OpenAI-compatible server — Ollama, llama.cpp, vLLM, `shammah serve`)",
        choices=("model", "teacher"),
    )
    revision_noninteractive: str = _f(
        "reject",
        "what piped/scripted input does with a rewrite nobody sees: reject it, accept it, or accept it only"
        " if it states what the note states (check)",
        choices=("reject", "check", "accept"),
    )
    note_only: str = _f(
        "distill",
        "what a bad reply with a note and no correction teaches: distill (the model's answer with the note in"
        " context is the teacher for the model without it) or avoid (only: not this reply)",
        choices=("distill", "avoid"),
    )
    gate: bool = _f(True, "swap a new adapter in only if it is not worse than the current one")
    scope: str = _f(
        "auto",
        "where a learned adapter answers: auto = questions that name its lessons' subject (a name the model had"
        " no token for, e.g. a made-up place) or are asked like its lessons' questions (a format taught on one"
        " kind of question), the base model elsewhere, and everywhere when a lesson has neither (a style);"
        " subjects = by subject only; everywhere = always",
        choices=("auto", "subjects", "everywhere"),
    )
    learning_rate: float = _f(1e-3, "learning rate of background training", lo=1e-6, hi=0.1)
    epochs: int = _f(3, "passes over the compiled feedback per job", lo=1, hi=100)
    scoped_epochs: int = _f(
        5,
        "passes per job when the new adapter answers only inside its lessons' subject or form (it trains"
        " no anchors; a form's questions include general ones: at 13 epochs one lost a control; 0 = learning.epochs)",
        lo=0,
        hi=100,
    )
    subject_epochs: int = _f(
        13,
        "passes per job when the new adapter answers only questions that name its lessons' subjects (facts"
        " about a made-up name: longer holds two such lessons apart on questions worded as neither was;"
        " 0 = learning.scoped_epochs)",
        lo=0,
        hi=100,
    )
    stop_at_accuracy: float = _f(
        0.0,
        "end a job early once the model's greedy choice reproduces this share of the taught answers' tokens"
        " (0 = run every epoch)",
        lo=0.0,
        hi=1.0,
    )
    preference_pairs: bool = _f(
        False,
        "also train corrections as preference pairs (DPO, correction over the reply); off: measured no gain on"
        " held-out lessons and 1.6x the step cost",
    )
    rank: int = _f(16, "LoRA rank of learned adapters", lo=1, hi=256)
    batch_size: int = _f(4, "examples per step", lo=1, hi=256)
    replay_limit: int = _f(50, "earlier (already trained) feedback items replayed in each job", lo=0, hi=100000)
    anchors: int = _f(
        20, "general prompts answered by the base model and replayed against leaks (0 = off)", lo=0, hi=200
    )
    anchor_loss: str = _f(
        "kl",
        "how anchors hold the base model: kl (its token distribution along its answer) or sft (its answer's text)",
        choices=("kl", "sft"),
    )
    anchor_span: str = _f(
        "opening",
        "what of the base's answer an anchor holds: its whole answer (48 tokens, the end left free) or only its"
        " opening sentence",
        choices=("answer", "opening"),
    )
    contrast_anchors: int = _f(
        0,
        "anchors that ask the lesson's own questions about this many other, known subjects (a taught inventor"
        " must not become every inventor)",
        lo=0,
        hi=10,
    )
    seed: int = _f(0, "random seed of background training (same feedback + seed = same adapter)", lo=0, hi=2**31 - 1)
    train_threads: int = _f(0, "CPU threads of the training process (0 = all cores)", lo=0, hi=1024)
    prewarm: bool = _f(
        True,
        "start the training process while feedback piles up, so a job starts without seconds of imports"
        " (an idle one holds ~0.35 GB until the job)",
    )
    pause_while_replying: bool = _f(True, "pause training while the chat writes a reply, so replies keep full speed")
    chat_threads_while_training: int = _f(0, "CPU threads of the chat while a job runs (0 = unchanged)", lo=0, hi=1024)


@dataclass(frozen=True)
class ServeConfig:
    host: str = _f("127.0.0.1", "address `shammah serve` binds (anything but loopback needs serve.token)")
    port: int = _f(8000, "port of `shammah serve`", lo=0, hi=65535)
    token: str = _f("", "API token: clients send 'Authorization: Bearer <token>' (empty = none, loopback only)")
    max_request_bytes: int = _f(1_000_000, "largest request body the server accepts (413 beyond)", lo=1024, hi=2**31)


@dataclass(frozen=True)
class PackagesConfig:
    publisher: str = _f("", "your name as a publisher in the .expert packages you sign (empty = your login name)")
    trusted_publishers: tuple[str, ...] = _f(
        (), "public keys (ed25519:<base64>, from `shammah keys show`) whose signed packages install without asking"
    )


@dataclass(frozen=True)
class PipelineConfig:
    teacher_url: str = _f(
        "", "OpenAI-compatible API root of the teacher model (e.g. http://127.0.0.1:8000/v1; `shammah serve` counts)"
    )
    teacher_model: str = _f("", "the teacher's model name (empty: the first model the endpoint lists)")
    teacher_key: str = _f("", "the teacher's API key (SHAMMAH_TEACHER_KEY)")
    examples: int = _f(200, "examples to generate per named training", lo=6, hi=1_000_000)
    batch_size: int = _f(10, "examples asked of the teacher per request", lo=1, hi=200)
    mix_positive: float = _f(0.6, "share of fully specified requests", lo=0.0, hi=1.0)
    mix_context: float = _f(0.2, "share of requests that lean on earlier context", lo=0.0, hi=1.0)
    mix_negative: float = _f(0.2, "share of requests to clarify or refuse", lo=0.0, hi=1.0)
    sft_epochs: int = _f(3, "epochs of the SFT stage", lo=1, hi=100)
    dpo_epochs: int = _f(2, "epochs of the DPO stage", lo=1, hi=100)
    learning_rate: float = _f(2e-4, "learning rate of both training stages", lo=1e-7, hi=1.0)
    gguf_type: str = _f("q8_0", "GGUF type of the quantize stage", choices=("f32", "f16", "bf16", "q8_0", "q4_0"))


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _f("warning", "log level for the log file and stderr", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    packages: PackagesConfig = field(default_factory=PackagesConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Environment variables that override config keys (applied after the file).
ENV_OVERRIDES: dict[str, str] = {
    "SHAMMAH_MODEL": "model.base",
    "SHAMMAH_DEVICE": "model.device",
    "SHAMMAH_DTYPE": "model.dtype",
    "SHAMMAH_THREADS": "model.threads",
    "SHAMMAH_LOG": "logging.level",
    "SHAMMAH_API_TOKEN": "serve.token",
    "SHAMMAH_TEACHER_KEY": "pipeline.teacher_key",
}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def iter_keys():
    """Yield (section, field) for every config key, in declaration order."""
    for sec, cls in sections().items():
        for f in fields(cls):
            yield sec, f


def _check_value(key: str, f, value: Any, from_env: str | None = None) -> tuple[Any, str | None]:
    where = f"{key} (from ${from_env})" if from_env else key
    if f.type in ("list[str]", "tuple[str, ...]"):
        if from_env is not None:
            value = [v.strip() for v in value.split(",") if v.strip()]
        empty_ok = f.default == ()
        if not (
            isinstance(value, list | tuple) and (value or empty_ok) and all(isinstance(v, str) and v for v in value)
        ):
            what = "list of names" if empty_ok else "non-empty list of names"
            return None, f"{where} = {value!r} has the wrong type: expected a {what}"
        return tuple(value), None
    if f.metadata.get("auto") and value == "auto":
        return value, None
    typ = {"int": int, "float": float, "str": str, "bool": bool}[f.type] if isinstance(f.type, str) else f.type
    orig = value
    expected = _TYPE_NAMES[typ] + (' or "auto"' if f.metadata.get("auto") else "")
    if from_env is not None:  # environment values arrive as strings
        try:
            if typ is bool:
                value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[value.lower()]
            elif typ in (int, float):
                value = typ(value)
        except (KeyError, ValueError):
            return None, f"{where} = {value!r} has the wrong type: expected {expected}"
    ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        return None, f"{where} = {value!r} has the wrong type: expected {expected}"
    if typ is float and not math.isfinite(value):  # nan slips through every range comparison
        return None, f"{where} = {orig!r} is not a number: expected a finite {expected}"
    m = f.metadata
    if m["choices"] and value not in m["choices"]:
        allowed = ", ".join(repr(c) for c in m["choices"])
        return None, f"{where} = {orig!r} is not allowed: choose one of {allowed}"
    if (m["lo"] is not None and value < m["lo"]) or (m["hi"] is not None and value > m["hi"]):
        return None, f"{where} = {orig!r} is out of range: must be between {m['lo']} and {m['hi']}"
    return value, None


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{hint}"


def check_fields(
    cls: type,
    body: dict[str, Any],
    prefix: str = "",
    known_keys: list[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Validate ``body`` against dataclass ``cls``: (accepted values, problems)."""
    known = {f.name: f for f in fields(cls)}
    values, problems = {}, []
    for name, value in body.items():
        key = f"{prefix}{name}"
        if name not in known:
            problems.append(_unknown(key, known_keys or [f"{prefix}{k}" for k in known]))
            continue
        checked, err = _check_value(key, known[name], value)
        if err:
            problems.append(err)
        else:
            values[name] = checked
    return values, problems


def from_dict(data: dict[str, Any], *, source: str = "config", env: dict[str, str] | None = None) -> Config:
    """Build a Config from parsed TOML plus env overrides, listing every problem at once."""
    problems: list[str] = []
    secs = sections()
    values: dict[str, dict[str, Any]] = {s: {} for s in secs}
    all_keys = [f"{s}.{f.name}" for s, f in iter_keys()]
    for sec, body in data.items():
        if sec not in secs:
            problems.append(_unknown(sec, list(secs)).replace("key", "section", 1))
            continue
        if not isinstance(body, dict):
            problems.append(f"'{sec}' must be a table ([{sec}]), got {body!r}")
            continue
        accepted, errs = check_fields(secs[sec], body, f"{sec}.", all_keys)
        values[sec].update(accepted)
        problems += errs
    for var, key in ENV_OVERRIDES.items():
        raw = (env if env is not None else os.environ).get(var)
        if raw is None or raw == "":
            continue
        sec, name = key.split(".")
        f = next(f for f in fields(secs[sec]) if f.name == name)
        checked, err = _check_value(key, f, raw, from_env=var)
        if err:
            problems.append(err)
        else:
            values[sec][name] = checked
    if problems:
        raise ConfigError(problems, source)
    return Config(**{s: secs[s](**values[s]) for s in secs})


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    return tomllib.loads(text)


def load_config(path: Path | None = None, *, env: dict[str, str] | None = None) -> tuple[Config, Path]:
    """Load ``path`` (or the default location); a missing default file means all defaults."""
    from shammah.paths import default_config_file

    explicit = path is not None
    path = Path(path) if explicit else default_config_file()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = _toml_loads(path.read_text())
        except Exception as e:  # tomllib.TOMLDecodeError carries line/column
            raise ConfigError([f"not valid TOML: {e}"], str(path)) from None
    elif explicit:
        raise ConfigError([f"file not found: {path} (copy config.example.toml to start one)"], str(path))
    return from_dict(data, source=str(path), env=env), path


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON strings are TOML basic strings
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def render(cfg: Config, origins: dict[str, str] | None = None) -> str:
    """``cfg`` as TOML that loads back as the same config (``shammah config`` prints it); a value
    set from outside the file (environment, a flag) says so in a comment: ``origins`` maps
    "section.key" to where it came from."""
    origins = origins or {}
    out = []
    for sec in sections():
        out.append(f"[{sec}]")
        for f in fields(getattr(cfg, sec)):
            where = origins.get(f"{sec}.{f.name}")
            out.append(
                f"{f.name} = {_toml_value(getattr(getattr(cfg, sec), f.name))}" + (f"  # {where}" if where else "")
            )
        out.append("")
    return "\n".join(out)


def render_example() -> str:
    """The documented default config, as config.example.toml holds it."""
    out = [
        "# shammah configuration: every key with its default value.",
        "# Copy to $SHAMMAH_HOME/config.toml (or pass --config PATH) and edit.",
        "# Environment overrides: " + ", ".join(f"{k} -> {v}" for k, v in ENV_OVERRIDES.items()),
        "",
    ]
    defaults = Config()
    for sec in sections():
        out.append(f"[{sec}]")
        for f in fields(getattr(defaults, sec)):
            m = f.metadata
            extra = ""
            if m["choices"]:
                extra = " (" + " | ".join(m["choices"]) + ")"
            elif m["lo"] is not None:
                extra = f" ({m['lo']}..{m['hi']})"
            out.append(f"# {m['doc']}{extra}")
            out.append(f"{f.name} = {_toml_value(getattr(getattr(defaults, sec), f.name))}")
        out.append("")
    return "\n".join(out)


def with_overrides(cfg: Config, **sections_kw: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with some keys replaced (validated like the file)."""
    data = {s: {f.name: getattr(getattr(cfg, s), f.name) for f in fields(getattr(cfg, s))} for s in sections()}
    for sec, kv in sections_kw.items():
        data.setdefault(sec, {}).update(kv)
    return from_dict(data, source="overrides", env={})


__all__ = [
    "Config",
    "ModelConfig",
    "ChatConfig",
    "FeedbackConfig",
    "LearningConfig",
    "LoggingConfig",
    "load_config",
    "from_dict",
    "render_example",
    "with_overrides",
]
