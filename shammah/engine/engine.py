"""The engine boundary: load a base model, stream replies, hot-swap adapters.

Everything above this package talks to :class:`Engine` only and never learns
which backend runs. Importing this module is cheap: torch and transformers are
imported by the loader thread, so the chat prompt is usable while they load.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from shammah.adapters.choice import Choice, choices_of
from shammah.adapters.rule import Rule
from shammah.adapters.scope import Scope, adapter_meta
from shammah.config import ModelConfig
from shammah.engine.resolve import ModelSpec, resolve
from shammah.errors import ModelError

if TYPE_CHECKING:
    from shammah.engine.generate import Chunk, GenParams
    from shammah.engine.loader import Loaded

log = logging.getLogger(__name__)

# Sampling where neither the config nor the model's generation_config says. Measured on the embedded
# SmolLM2-135M (shared/MEASURED.md): at 0.7 / top-p 0.9 / repetition penalty 1.1 it rambles (hashtags,
# invented facts) and gets simple questions right one run and wrong the next; a low temperature and no
# repetition penalty (which pushes it off the words of the question it should repeat) keep it on topic.
FALLBACK_SAMPLING: dict[str, float | int] = {"temperature": 0.2, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class AdapterRef:
    """An adapter to answer one request with (``shammah serve``): its registry name, directory and
    the fingerprint of the base it was trained on. ``name=None`` is the base model alone."""

    name: str | None
    path: Path | None = None
    fingerprint: str | None = None


class Recorded(NamedTuple):
    """What an adapter's metadata says the engine does with it (the base model: nothing)."""

    scope: Scope = Scope()
    rule: Rule | None = None
    choices: tuple[Choice, ...] = ()


class Engine:
    def __init__(self, cfg: ModelConfig, cache_dir, spec: ModelSpec | None = None):
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.spec = spec or resolve(cfg.base)
        self._loaded: Loaded | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._gen_lock = threading.Lock()
        self.adapter: str | None = None  # name of the active adapter (None = base model)
        self._peft = None  # PeftModel wrapping the base once an adapter was loaded
        self._slot_config: dict | None = None  # adapter_config.json of what sits in the slot
        self._slot_name: str | None = None  # which adapter's weights are in the live slot
        self._slot = "slot0"  # the live slot's PEFT adapter name
        self._fingerprint: str | None = None
        self.last_swap_seconds: float | None = None
        self._fast = None  # FastDecoder: the CPU fast path (engine/fast.py), when it applies
        self._fast_why = "not loaded yet"  # why not, when it does not
        self._adapter_src: tuple | None = None  # (path, adapter_config) of the active adapter
        self.scope = Scope()  # where the active adapter answers (adapters/scope.py); the base elsewhere
        self.rule: Rule | None = None  # the active adapter's style rule, put on every reply (adapters/rule.py)
        self.choices: tuple[Choice, ...] = ()  # the active adapter's closed sets of answers (adapters/choice.py)
        self._keys: dict[tuple[str, int, int], list[float]] = {}  # question keys for a form scope

    # loading ---------------------------------------------------------------
    def start_loading(self) -> None:
        """Load in a background thread; :meth:`wait` or :meth:`load` to join it."""
        if self._thread is None and not self._ready.is_set():
            self._thread = threading.Thread(target=self._load, name="shammah-load", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        try:
            from shammah.engine import loader

            c = self.cfg
            self._loaded = loader.load(
                self.spec, cache=self.cache_dir, device=c.device, dtype=c.dtype, threads=c.threads
            )
            self._fast, self._fast_why = self._fast_decoder()
        except BaseException as e:  # kept and re-raised in the thread that waits
            log.debug("load failed", exc_info=True)
            self._error = e if isinstance(e, ModelError) else ModelError(f"could not load {self.spec.name}: {e}")
        finally:
            self._ready.set()

    def _fast_decoder(self):
        """(decoder, "") for a fast decode path, or (None, why not): llama.cpp where asked for, else
        the packed CPU path. Never llama.cpp by default: its float order differs, and on the embedded
        model a near tie then tips "What is the capital of France?" into French rambling, where the
        packed path (like transformers) answers "Paris" — installing an extra must not change answers."""
        setting, loaded = self.cfg.fast_decode, self._loaded
        from shammah.engine import llamacpp

        if setting == "llamacpp":
            if not llamacpp.available():
                return (
                    None,
                    "model.fast_decode = llamacpp but llama-cpp-python is not installed (pip install 'shammah[llama]')",
                )
            t0 = time.perf_counter()
            gguf = llamacpp.base_gguf(self.spec, Path(loaded.path), loaded.model, loaded.tokenizer, self.cache_dir)
            broken = llamacpp.probe(gguf, self.cache_dir)
            if broken is not None:  # the packed path instead, and /status says why
                log.warning("%s", broken)
                dec, why = _fast_decoder(loaded.model, "auto", self.cache_dir)
                if dec is None:
                    return None, f"{broken} (and no packed path: {why})"
                dec.label += f"; not llama.cpp: {broken}"
                return dec, ""
            dec = llamacpp.LlamaCppDecoder(gguf, loaded.model.config, self.cache_dir, self.cfg.threads)
            log.info("llama.cpp decode ready in %.2f s", time.perf_counter() - t0)
            return dec, ""
        return _fast_decoder(loaded.model, setting, self.cache_dir)

    def wait(self, timeout: float | None = None) -> bool:
        """True once loading finished (successfully or not) within ``timeout``."""
        self.start_loading()
        return self._ready.wait(timeout)

    def load(self) -> Engine:
        self.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def loaded(self) -> Loaded:
        self.load()
        assert self._loaded is not None
        return self._loaded

    @property
    def model(self):
        return self._peft if self._peft is not None else self.loaded.model

    # adapters --------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from shammah.engine.fingerprint import fingerprint

            self._fingerprint = fingerprint(self.loaded.path)
        return self._fingerprint

    def activate(self, name: str | None, path=None, base_fingerprint: str | None = None) -> float:
        """Make adapter ``name`` (a PEFT LoRA directory at ``path``) answer from the next turn on;
        ``None`` = the base model alone. Waits for a reply in progress, never cuts one; the base
        model is never reloaded. A refused or failed load changes nothing: the adapter that was
        answering still answers. Returns the seconds the chat was blocked."""
        cfg = self._check(name, path, base_fingerprint)
        rec = self._recorded(path) if name is not None else Recorded()  # read before the lock
        t0 = time.perf_counter()
        with self._gen_lock:
            self._switch(name, path, cfg, rec)
        self.last_swap_seconds = time.perf_counter() - t0
        return self.last_swap_seconds

    @staticmethod
    def _recorded(path) -> Recorded:
        """What an adapter's metadata says the engine does with it: where it answers (its scope),
        the rule put on every reply and the answers it chooses from. One read of its shammah.json
        (and of the files it names), outside the generation lock."""
        meta = adapter_meta(path)
        return Recorded(Scope.of_adapter(path, meta), Rule.recorded(meta.get("rule")), choices_of(path, meta))

    def _check(self, name: str | None, path, base_fingerprint: str | None) -> dict:
        """The adapter's config, once it is known to fit this base (ModelError / AdapterError if not)."""
        if name is None:
            return {}
        if base_fingerprint is not None and base_fingerprint != self.fingerprint():
            raise ModelError(
                f"adapter {name!r} was trained on another base model than {self.spec.name}; it cannot be loaded here"
            )
        from shammah.adapters.registry import check_lora

        return check_lora(Path(path))

    def _switch(self, name: str | None, path, cfg: dict, rec: Recorded) -> None:
        """Make ``name`` answer (the generation lock is held)."""
        fast_ok = self._fast is not None and self._fast_load(name, path)
        if not fast_ok and name is not None and self._slot_name != name:
            self._load_into_slot(name, Path(path), cfg)
        # on the fast path, transformers' copy loads the adapter only if it is ever needed
        self._adapter_src = (Path(path), cfg) if name is not None else None
        self.adapter = name
        if name is None:
            rec = Recorded()
        self.scope, self.rule, self.choices = rec

    def covers(self, messages: list[dict]) -> bool:
        """Does the active adapter answer ``messages``? Its scope is checked against the newest user
        message (an adapter without a scope answers everything)."""
        if self.adapter is None or self.scope.everywhere:
            return True
        last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        return self.scope.covers(last if isinstance(last, str) else "", self._key_of)

    def _key_of(self, text: str) -> list[float]:
        """A question's key for a form scope (engine/keys.py), by the base model; the last few are
        kept (the same question is routed by stream, then by a retry or /feedback show)."""
        form = self.scope.form
        return self._key_at(text, *((form.layer, form.tokens) if form is not None else (0, 0)))

    def _key_at(self, text: str, layer: int, tokens: int) -> list[float]:
        """A question's key at ``layer`` over its first ``tokens`` tokens (for a scope or a choice)."""
        from shammah.engine.keys import question_key

        k = (text, layer, tokens)
        if k not in self._keys:
            if len(self._keys) >= 64:
                self._keys.pop(next(iter(self._keys)))
            self._keys[k] = question_key(self.model, self.tokenizer, text, layer, tokens)
        return self._keys[k]

    @contextlib.contextmanager
    def _fast_plain(self):
        """The fast path answers with the base alone for one reply (a pointer swap; the adapter
        stays resident and comes back after it)."""
        name, (path, _) = self.adapter, self._adapter_src
        self._fast.set_lora(None, None)
        try:
            yield
        finally:
            self._fast.set_lora(name, path)

    def _fast_load(self, name: str | None, path) -> bool:
        """Give the fast path adapter ``name``; False if only transformers can run it."""
        from shammah.engine.fast import AdapterUnsupported

        if self._fast.lora_name == name and name is not None:
            return True
        try:
            self._fast.set_lora(name, Path(path) if path is not None else None)
        except AdapterUnsupported as e:
            log.info("adapter %s answers through transformers: %s", name, e)
            return False
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelError(f"adapter {name!r} at {path} could not be loaded ({e}); the current one stays") from None
        return True

    def _hf_model(self):
        """transformers' model with the active adapter (loaded into its slot now if the fast path
        was answering alone), for batches and for what the fast path cannot run."""
        if self.adapter is not None and self._slot_name != self.adapter:
            path, cfg = self._adapter_src
            self._load_into_slot(self.adapter, path, cfg)
        return self.model

    @property
    def fast(self) -> bool:
        """The fast path answers the next reply."""
        return self._fast is not None and self._fast.lora_name == self.adapter

    def _load_into_slot(self, name: str, path, cfg: dict) -> None:
        """Two slots: a new adapter is hot-swapped into the live one's weights when the shapes
        match (~60 ms), else loaded into the spare slot, which goes live only once it loaded."""
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.loaded.model, str(path), adapter_name="slot0")
                self._slot = "slot0"
            elif not self._hotswap(path, cfg):
                spare = "slot1" if self._slot == "slot0" else "slot0"
                if spare in self._peft.peft_config:
                    self._peft.delete_adapter(spare)
                self._peft.load_adapter(str(path), adapter_name=spare)
                self._peft.set_adapter(spare)
                self._peft.delete_adapter(self._slot)
                self._slot = spare
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelError(f"adapter {name!r} at {path} could not be loaded ({e}); the current one stays") from None
        self._peft.eval()
        self._slot_config = cfg
        self._slot_name = name

    def _hotswap(self, path, cfg: dict) -> bool:
        same_shape = self._slot_config is not None and all(
            cfg.get(k) == self._slot_config.get(k)
            for k in ("r", "lora_alpha", "target_modules", "use_dora", "rank_pattern", "alpha_pattern")
        )
        if not same_shape or cfg.get("use_dora"):
            return False
        from peft.utils.hotswap import hotswap_adapter

        try:  # peft checks the shapes of every tensor before it copies any
            hotswap_adapter(self._peft, str(path), adapter_name=self._slot, torch_device=self.loaded.device)
        except (ValueError, RuntimeError, KeyError):
            log.debug("hotswap failed, loading into the spare slot", exc_info=True)
            return False
        return True

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def info(self) -> dict[str, str]:
        out = {"model": self.spec.name, "adapter": self.adapter or "none (base model)"}
        if self.adapter is not None:
            out["scope"] = self.scope.describe()
            if self.rule:
                out["rule"] = self.rule.on_replies("(every reply)")
            if self.choices:
                out["choices"] = "; ".join(c.describe() for c in self.choices)
        if self._loaded is not None:
            out.update(device=self._loaded.device, dtype=self._loaded.dtype, weights=self._loaded.path)
            where = {"config": "config", "model": "the model's generation_config", "default": "shammah default"}
            out["sampling"] = ", ".join(f"{k} {v:g} ({where[src]})" for k, (v, src) in self.sampling().items())
            out["decode"] = (
                f"fast path: {self._fast.label}"
                if self.fast
                else "transformers generate"
                + (f" ({self._fast_why})" if self._fast is None else " (the active adapter needs it)")
            )
        elif self._error is not None:
            out["state"] = f"failed to load: {self._error}"
        else:
            out["state"] = "loading…"
        return out

    # generation ------------------------------------------------------------
    def context_window(self) -> int:
        model_max = int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)
        return min(self.cfg.context_window, model_max) if self.cfg.context_window else model_max

    def encode(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def prepare(self, messages: list[dict], max_new_tokens: int) -> tuple[list[int], list[dict]]:
        """Token ids for ``messages`` fitted to the context window: the oldest exchanges are dropped
        first (the system prompt and the newest user message are kept)."""
        budget = max(16, self.context_window() - max_new_tokens)
        kept = list(messages)
        ids = self.encode(kept)
        while len(ids) > budget:
            first = 1 if kept and kept[0]["role"] == "system" else 0
            if len(kept) - first <= 1:  # only the newest message is left: keep its tail
                ids = ids[-budget:]
                break
            del kept[first]
            if len(kept) - first > 1 and kept[first]["role"] == "assistant":
                del kept[first]
            ids = self.encode(kept)
        return ids, kept

    def sampling(self) -> dict[str, tuple[float, str]]:
        """The sampling settings in force and where each comes from: the config, the model's own
        ``generation_config.json`` (Qwen ships tuned values), or shammah's fallback."""
        import json
        from pathlib import Path

        model_says: dict = {}
        f = Path(self.loaded.path) / "generation_config.json"
        if f.is_file():
            try:
                model_says = json.loads(f.read_text())
            except (OSError, ValueError):
                log.warning("unreadable %s; using shammah's sampling defaults", f)
            if model_says.get("do_sample") is False and "temperature" not in model_says:
                model_says["temperature"] = 0.0
        out = {}
        for key, fallback in FALLBACK_SAMPLING.items():
            value = getattr(self.cfg, key)
            if value != "auto":
                out[key] = (value, "config")
            elif isinstance(model_says.get(key), int | float) and not isinstance(model_says.get(key), bool):
                out[key] = (type(fallback)(model_says[key]), "model")
            else:
                out[key] = (fallback, "default")
        return out

    def gen_params(self, **overrides) -> GenParams:
        from shammah.engine.generate import GenParams

        c = self.cfg
        base = {k: v for k, (v, _) in self.sampling().items()}
        base.update(max_new_tokens=c.max_new_tokens, seed=c.seed)
        base.update(overrides)
        return GenParams(**base)

    def stream(
        self,
        messages: list[dict],
        params: GenParams | None = None,
        stop: threading.Event | None = None,
        info: dict | None = None,
        adapter: AdapterRef | None = None,
    ) -> Iterator[Chunk]:
        """Stream a reply to ``messages`` (chat-template dicts). One generation at a time;
        ``info["adapter"]`` is set to the adapter that answers: ``adapter`` when given (it stays
        loaded afterwards: the server names one per request), else the active one;
        ``info["in_scope"]`` is False where the question is outside the adapter's scope and the
        base model answered. The active adapter's style rule is on every reply, in scope or not."""
        params = params or self.gen_params()
        ids, _ = self.prepare(messages, params.max_new_tokens)
        cfg = self._check(adapter.name, adapter.path, adapter.fingerprint) if adapter is not None else None
        # read outside the lock where a switch is likely (a form's vectors take ~20 ms to parse)
        switch = adapter is not None and adapter.name != self.adapter
        rec = self._recorded(adapter.path) if switch else None
        with self._gen_lock:
            if switch:
                self._switch(adapter.name, adapter.path, cfg, rec)
            covered = self.covers(messages)
            if info is not None:
                info["adapter"], info["in_scope"] = self.adapter, covered
            t0 = time.perf_counter()
            chosen = self._chosen([messages])[0]
            if chosen is None:
                chunks = self._stream(ids, params, stop, covered)
            else:
                from shammah.engine.generate import Chunk

                said = tuple(self.tokenizer.encode(chosen, add_special_tokens=False))
                chunks = iter([Chunk(chosen, said, "stop", len(said), time.perf_counter() - t0)])
            yield from self.rule.stream(chunks, _asked(messages), covered) if self.rule else chunks

    def _stream(self, ids: list[int], params: GenParams, stop, covered: bool) -> Iterator[Chunk]:
        """The model's own chunks (the generation lock is held)."""
        import torch

        from shammah.engine.generate import stream_fast, stream_generate

        if self.fast:
            with contextlib.nullcontext() if covered else self._fast_plain():
                yield from stream_fast(self._fast, self.tokenizer, ids, params, stop)
            return
        model = self._hf_model()
        input_ids = torch.tensor([ids], device=self.loaded.device)
        off = self._peft is not None and (self.adapter is None or not covered)
        with self._peft.disable_adapter() if off else contextlib.nullcontext():
            yield from stream_generate(model, self.tokenizer, input_ids, params, stop)

    def answers(self, chats: list[list[dict]], max_new_tokens: int) -> list[str]:
        """Greedy replies to several chats at once, by the active adapter where its scope covers
        them and by the base elsewhere (evaluation, not chat: batched decode costs about what one
        reply does)."""
        from shammah.engine.generate import generate_batch, generate_routed

        with self._gen_lock:
            model = self._hf_model()
            chosen = self._chosen(chats)
            todo = [c for c, said in zip(chats, chosen, strict=True) if said is None]
            if not todo:
                out = []
            elif self._peft is None:
                out = generate_batch(model, self.tokenizer, todo, max_new_tokens)
            else:
                on = [self.adapter is not None and self.covers(c) for c in todo]
                out = generate_routed(model, self.tokenizer, todo, max_new_tokens, on)
            said = iter(out)
            out = [c if c is not None else next(said) for c in chosen]
            rule = self.rule
            if not rule:
                return out
            covered = [self.covers(c) for c in chats] if rule.words else [True] * len(chats)
            return [rule.apply(a, _asked(c), on) for a, c, on in zip(out, chats, covered, strict=True)]

    def _chosen(self, chats: list[list[dict]]) -> list[str | None]:
        """Per chat, the answer of the active adapter's closed sets to its newest user message
        (adapters/choice.py: the user's own answer to that very question, else the first set that
        gives one), or None where the model answers: no set, a question not asked like the taught
        ones, one to which the model does not expect an answer of the set, or one the user answered
        with something else (the generation lock is held)."""
        if self.adapter is None or not self.choices:
            return [None] * len(chats)
        lasts = [_asked(c) for c in chats]
        # per chat and set: the user's own answer to that very question ("": not this set's to answer)
        told = [[c.told(q) for c in self.choices] for q in lasts]
        out: list[str | None] = [next((t for t in said if t), None) for said in told]
        from shammah.engine.choices import first_token_logprobs

        def logprobs_of(questions, answers):
            return first_token_logprobs(self.model, self.tokenizer, questions, answers)

        for j, choice in enumerate(self.choices):
            asked = [i for i in range(len(chats)) if out[i] is None and told[i][j] is None]
            key_of = functools.partial(self._key_at, layer=choice.form.layer, tokens=choice.form.tokens)
            for i, a in zip(asked, choice.say([lasts[i] for i in asked], key_of, logprobs_of), strict=True):
                out[i] = a
        return out

    def reply(self, messages: list[dict], params: GenParams | None = None) -> str:
        return "".join(c.text for c in self.stream(messages, params))


def _fast_decoder(model, setting: str, cache: Path | None = None):
    """(FastDecoder, "") for the fast CPU path, or (None, why not). ``cache``: where its C kernels
    are compiled (engine/ckernel.py; without them it runs in torch ops)."""
    if setting == "off":
        return None, "model.fast_decode = off"
    from shammah.engine import fast

    why = fast.unsupported(model)
    if why is not None:
        return None, why
    # Any CPU: auto used to leave out CPUs without native bf16, where the emulated rounding of the
    # bf16 activations tipped "What is the capital of France?" into "L'Étoile..." ("L" 24.74 vs
    # "The" 24.65). That was the int8 head's bf16 logits; since the likeliest 64 are recomputed in
    # fp32 (FastDecoder.forward), an AVX2-only EPYC answers "Paris" as transformers does.
    quant = "int4" if setting == "auto" else setting
    if not fast.kernel_available(quant):
        if setting == "auto" and fast.kernel_available("int8"):
            quant = "int8"
        else:
            return None, f"this torch build has no packed {quant} CPU kernel"
    t0 = time.perf_counter()
    from shammah.engine import ckernel

    kernel, kernel_why = ckernel.load(cache)
    if kernel is None:
        log.info("the fast path runs in torch ops, without its C kernels: %s", kernel_why)
    dec = fast.FastDecoder(model, quant, kernel, kernel_why)
    log.info("fast path ready (%s) in %.2f s", quant, time.perf_counter() - t0)
    return dec, ""


def _asked(messages: list[dict]) -> str:
    """The newest user message of a chat ("" where there is none, or it is not text)."""
    q = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    return q if isinstance(q, str) else ""
