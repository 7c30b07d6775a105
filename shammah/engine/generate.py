"""Generation as a stream of small records.

``stream_generate`` runs ``model.generate`` on a worker thread and yields a
:class:`Chunk` per decoded piece of text; the last chunk carries the finish
reason ("stop", "length" or "interrupted") and the speed. It knows nothing
about feedback, adapters or terminals.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = -1


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # set on the last chunk only
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


_DONE = object()


class _QueueStreamer(BaseStreamer):
    """Receives token ids from ``generate``; the first put() is the prompt and is skipped."""

    def __init__(self, q: queue.Queue):
        self.q = q
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Stop(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generate(
    model,
    tokenizer,
    input_ids,
    params: GenParams,
    stop: threading.Event | None = None,
) -> Iterator[Chunk]:
    import torch

    stop = stop or threading.Event()
    q: queue.Queue = queue.Queue()
    eos = tokenizer.eos_token_id
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=params.max_new_tokens,
        streamer=_QueueStreamer(q),
        stopping_criteria=StoppingCriteriaList([_Stop(stop)]),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        eos_token_id=eos,
        repetition_penalty=params.repetition_penalty,
    )
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    error: list[BaseException] = []

    def run() -> None:
        try:
            if params.seed >= 0:
                torch.manual_seed(params.seed)
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # surfaced to the consumer below
            error.append(e)
        finally:
            q.put(_DONE)

    t0 = time.perf_counter()
    worker = threading.Thread(target=run, name="shammah-generate", daemon=True)
    worker.start()

    def batches() -> Iterator[list[int]]:
        while (item := q.get()) is not _DONE:
            yield item
        if error:  # before the closing chunk: a failed reply does not look finished
            raise error[0]

    try:
        yield from _chunks(batches(), tokenizer, params, stop, t0)
    finally:
        stop.set()  # consumer went away early (e.g. generator closed): end generation
        worker.join()


def stream_fast(decoder, tokenizer, ids: list[int], params: GenParams, stop: threading.Event | None = None):
    """The same stream of chunks from a fast decoder (engine/fast.py, engine/llamacpp.py)."""
    stop = stop or threading.Event()
    t0 = time.perf_counter()
    tokens = decoder.tokens(ids, params, tokenizer.eos_token_id, stop)
    yield from _chunks(([t] for t in tokens), tokenizer, params, stop, t0)


def _chunks(batches: Iterator[list[int]], tokenizer, params: GenParams, stop: threading.Event, t0: float):
    """Token ids as they come -> text chunks (whole characters only), then the closing chunk."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    emitted = ""
    last_id = None
    for item in batches:
        for tid in item:
            last_id = tid
            if tid == eos:
                continue
            ids.append(tid)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        if len(text) > len(emitted) and text.startswith(emitted):
            yield Chunk(text[len(emitted) :], tuple(item))
            emitted = text
    interrupted = stop.is_set()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    n = len(ids) + (1 if last_id == eos else 0)
    if last_id == eos:
        reason = "stop"
    elif interrupted and n < params.max_new_tokens:
        reason = "interrupted"
    else:
        reason = "length"
    yield Chunk(text[len(emitted) :], (), reason, n, time.perf_counter() - t0)


def generate_batch(model, tok, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to several chats at once (left-padded: decode is memory-bound, so a
    batch costs about as much as one)."""
    import torch

    side = tok.padding_side
    tok.padding_side = "left"
    try:
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
    finally:
        tok.padding_side = side
    return [tok.decode(o[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() for o in out]


def generate_routed(model, tok, prompts: list[list[dict]], max_new_tokens: int, adapter_on: list[bool]) -> list[str]:
    """:func:`generate_batch` with a PEFT ``model``'s adapter on for the chats where ``adapter_on``
    says so and disabled (the base model) for the rest: one batch each, answers in order."""
    import contextlib

    out: dict[int, str] = {}
    for on in (True, False):
        idx = [i for i, o in enumerate(adapter_on) if o == on]
        if idx:
            with contextlib.nullcontext() if on else model.disable_adapter():
                answers = generate_batch(model, tok, [prompts[i] for i in idx], max_new_tokens)
            out.update(zip(idx, answers, strict=True))
    return [out[i] for i in range(len(prompts))]
