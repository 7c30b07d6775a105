"""The HTTP API (FastAPI): OpenAI-compatible chat completions and models, plus feedback,
adapters and training jobs. Every error is an OpenAI-style body: {"error": {"message", "type",
"param", "code"}}. The OpenAPI spec is at /openapi.json (docs at /docs)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from shammah import __version__
from shammah.errors import ShammahError
from shammah.feedback import compile as fbc
from shammah.serve.queue import JobError
from shammah.serve.server import DEFAULT_MODEL, ApiError, Server

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 409: "conflict_error"}
ERROR_TYPES |= {413: "invalid_request_error", 503: "server_error"}
API_STATUS = {"done": "succeeded"}  # the store's job states as the API names them


# --- request bodies -------------------------------------------------------------------------
class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields shammah has no use for (user, logprobs: false, ...)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    n: int = Field(1, ge=1, le=1)
    store: bool = Field(
        True, description="record the completion as a turn that /v1/feedback can rate (false: a throwaway answer)"
    )


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="the chat completion id (chatcmpl-...) the feedback is about")
    rating: Literal["good", "medium", "critical"] | None = None
    note: str | None = Field(None, max_length=10000)
    fix: str | None = Field(None, min_length=1, max_length=100000, description="the answer it should have given")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["dataset", "feedback"] = "dataset"
    dataset: str | None = Field(None, description="JSONL file on the server's machine (source = dataset)")
    validation: str | None = None
    name: str | None = Field(None, description="adapter name (default: trained-<date>-<id>)")
    parent: str | None = Field(None, description="continue training this adapter")
    settings: dict[str, Any] = Field(default_factory=dict, description="training settings, as `shammah train` flags")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 409, 413, 503)}


# --- the app ---------------------------------------------------------------------------------
def create_app(srv: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await srv.start(srv.url)
        try:
            yield
        finally:
            await srv.stop()

    app = FastAPI(title="shammah", version=__version__, lifespan=lifespan, responses=ERRORS)
    token = srv.cfg.serve.token
    limit = srv.cfg.serve.max_request_bytes

    def error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
        body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param}}
        body["error"]["code"] = code
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error(e.status, str(e), e.param, e.code, e.headers)

    @app.exception_handler(JobError)
    async def _job_error(request: Request, e: JobError):
        return error(e.status, str(e), e.param)

    @app.exception_handler(ShammahError)
    async def _shammah_error(request: Request, e: ShammahError):  # a broken adapter, a feedback mistake: say it
        return error(400, str(e).replace("\n", " "))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return error(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else "error"
        if e.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path}"
        return error(e.status_code, msg)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if token and request.url.path not in ("/health",):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                return error(401, "missing or wrong API token: send 'Authorization: Bearer <serve.token>'")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            return error(413, f"request body of {size} bytes is over serve.max_request_bytes ({limit})")
        return await call_next(request)

    # --- health and models --------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok" if srv.engine.ready else "loading", "model": srv.engine.spec.name}

    @app.get("/v1/models")
    async def models() -> dict:
        now = int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "shammah"} for m in srv.model_ids()]
        for a in srv.registry.list():
            data.append({"id": a.name, "object": "model", "created": int(a.path.stat().st_mtime), "owned_by": "user"})
        return {"object": "list", "data": data}

    # --- chat -----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        srv.require_ready()
        engine = srv.engine
        ref = srv.resolve(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "messages: the last message must be the user's", param="messages")
        max_new = req.max_completion_tokens or req.max_tokens or engine.cfg.max_new_tokens
        overrides: dict[str, Any] = {"max_new_tokens": max_new}
        if req.temperature is not None:
            overrides["temperature"] = req.temperature
        if req.top_p is not None:
            overrides["top_p"] = req.top_p
        if req.seed is not None:
            overrides["seed"] = req.seed
        params = engine.gen_params(**overrides)
        prompt_ids = engine.encode(messages)
        window = engine.context_window()
        if len(prompt_ids) > window - 1:
            raise ApiError(
                413,
                f"messages are {len(prompt_ids)} tokens; the model's context window is {window}",
                param="messages",
                code="context_length_exceeded",
            )
        params = replace(params, max_new_tokens=min(params.max_new_tokens, window - len(prompt_ids)))
        stops = [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]
        cid = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        model_id = req.model or DEFAULT_MODEL
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        info: dict = {}

        def produce() -> None:  # a worker thread: the event loop keeps serving
            try:
                for chunk in engine.stream(messages, params, stop=stop, info=info, adapter=ref):
                    loop.call_soon_threadsafe(q.put_nowait, chunk)
            except BaseException as e:
                loop.call_soon_threadsafe(q.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(q.put_nowait, None)

        async def pieces():
            """(text, finish reason or None) as the reply is written; the turn is stored at the end."""
            matcher = StopMatcher(stops)
            text, reason, last = "", None, None
            with srv.writing():
                worker = loop.run_in_executor(srv.gen_pool, produce)
                try:
                    while (item := await q.get()) is not None:
                        if isinstance(item, BaseException):
                            raise item
                        last = item
                        if reason is not None:
                            continue
                        out, hit = matcher.feed(item.text)
                        if hit:
                            reason = "stop"
                            stop.set()
                        if out:
                            text += out
                            yield out, None
                    if reason is None:
                        rest = matcher.flush()
                        if rest:
                            text += rest
                            yield rest, None
                finally:
                    stop.set()
                    await asyncio.shield(worker)
            if reason is None:
                reason = {"length": "length"}.get(last.finish_reason if last else "", "stop")
            if req.store:
                conv = srv.store.new_conversation(engine.spec.name, _system(messages))
                srv.store.add_turn(
                    conv,
                    messages,
                    messages[-1]["content"],
                    text.strip(),
                    model=engine.spec.name,
                    adapter=info.get("adapter"),
                    finish_reason=reason,
                    new_tokens=last.new_tokens if last else 0,
                    seconds=last.seconds if last else 0.0,
                    completion_id=cid,
                )
            usage = {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": last.new_tokens if last else 0,
                "total_tokens": len(prompt_ids) + (last.new_tokens if last else 0),
            }
            yield "", {"finish_reason": reason, "usage": usage, "adapter": info.get("adapter")}

        headers = {"X-Shammah-Adapter": ref.name or "none"}
        if not req.stream:
            parts, end = [], {}
            async for piece, fin in pieces():
                parts.append(piece)
                end = fin or end
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model_id,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(parts).strip()},
                            "finish_reason": end["finish_reason"],
                        }
                    ],
                    "usage": end["usage"],
                    "adapter": end["adapter"],
                },
                headers=headers,
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def sse(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
            body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created}
            body["model"] = model_id
            body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            yield sse({"role": "assistant", "content": ""})
            first = True
            async for piece, fin in pieces():
                if fin is not None:
                    yield sse({}, fin["finish_reason"])
                    if include_usage:
                        yield sse({}, usage=fin["usage"], choices=False)
                elif piece:
                    yield sse({"content": piece.lstrip() if first else piece})
                    first = False
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # --- feedback -------------------------------------------------------------------------------
    @app.post("/v1/feedback")
    async def feedback(req: FeedbackRequest) -> dict:
        turn_id = srv.store.turn_of_completion(req.id)
        if turn_id is None:
            raise ApiError(404, f"no chat completion {req.id!r} (ids come from /v1/chat/completions)", param="id")
        if req.rating is None and req.fix is None:
            raise ApiError(400, "give a rating (good, medium, critical), a fix, or both", param="rating")
        if req.rating in ("medium", "critical") and not (req.note or "").strip():
            raise ApiError(400, f"a {req.rating} rating needs a note saying what was wrong", param="note")
        if req.rating == "good" and req.fix is not None:
            raise ApiError(400, "a fix says the reply was not good: rate it medium or critical", param="fix")
        ids = []
        if req.rating is not None:
            ids.append(srv.store.rate(turn_id, req.rating, req.note or None).id)
        if req.fix is not None:
            ids.append(srv.store.fix(turn_id, req.fix).id)
        # No note-guided rewrite here: nobody would see it before it is trained (the chat's
        # learning.revision_noninteractive = "reject" default); a note alone is learned by
        # context distillation (learning.note_only), exactly as in a piped chat.
        lesson = fbc.decide(srv.store.turn_feedback(turn_id), srv.store.weights)
        msg = srv.jobs.maybe_trigger()
        return {
            "object": "feedback",
            "id": ids[-1],
            "feedback_ids": ids,
            "completion_id": req.id,
            "weight": lesson.weight,
            "teaches": lesson.source,
            "buffer": buffer_view(),
            "training": msg,
        }

    def buffer_view() -> dict:
        buf = fbc.buffer(srv.store)
        return {"weighted": buf.weighted, "threshold": srv.cfg.learning.threshold, "examples": buf.examples}

    def training_view() -> dict:
        """The feedback loop's training now: pending (a job runs or starts once the feedback settles)
        and the running job's status line."""
        current = srv.jobs.current
        return {
            "pending": srv.jobs.running,
            "job": current.id if current else None,
            "queued": srv.jobs.queued[1] if srv.jobs.queued else None,
            "status": srv.jobs.status_line(),
        }

    @app.get("/v1/feedback")
    async def feedback_state() -> dict:
        """The training buffer and the feedback loop's job (the chat's status bar when it uses this server)."""
        return {"object": "feedback.buffer", "buffer": buffer_view(), "training": training_view()}

    @app.post("/v1/feedback/check")
    async def feedback_check() -> dict:
        """Feedback was written to the store by another process on this home (the chat): train if the
        buffer is now over the threshold, by the same rule as after POST /v1/feedback."""
        msg = srv.jobs.maybe_trigger()
        return {"object": "feedback.buffer", "buffer": buffer_view(), "training": training_view(), "message": msg}

    # --- adapters -------------------------------------------------------------------------------
    @app.get("/v1/adapters")
    async def adapters() -> dict:
        active = srv.default_adapter
        data = []
        for a in srv.registry.list():
            meta = {k: a.meta.get(k) for k in ("method", "adapter_type", "parent", "created", "rule")}
            meta["final_train_loss"] = a.get("report", "final_train_loss")  # was read from the top level: always null
            data.append({"object": "adapter", "id": a.name, "active": a.name == active, **meta})
        return {"object": "list", "data": data, "active": active}

    def _known(name: str) -> None:
        if not srv.registry.exists(name):
            raise ApiError(404, f"no adapter named {name!r} (GET /v1/adapters lists them)", param="name")

    @app.post("/v1/adapters/{name:path}/activate")  # :path: a base model's id can hold a slash
    async def activate(name: str) -> dict:
        srv.require_ready()
        if name == srv.engine.spec.name:
            target = None
        else:
            _known(name)
            target = name
        secs = await srv.jobs.activate(target)
        return {"object": "adapter", "id": name, "active": True, "swap_ms": round(secs * 1000, 1)}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str) -> dict:
        _known(name)
        if name == srv.default_adapter:
            raise ApiError(409, f"{name} is the active adapter: activate another one first", param="name")
        training = [srv.store.job(j) for j, _ in srv.store.running_jobs()]
        if any(row and row["parent"] == name for row in training):
            raise ApiError(409, f"{name} is the parent of a job training now; delete it afterwards", param="name")
        srv.registry.delete(name)
        return {"object": "adapter", "id": name, "deleted": True}

    # --- jobs -----------------------------------------------------------------------------------
    def job_view(row: dict) -> dict:
        status = API_STATUS.get(row["status"], row["status"])
        out = {
            "object": "training.job",
            "id": row["id"],
            "kind": row["kind"],
            "status": status,
            "created_at": row["created_at"],
            "finished_at": row["finished_at"],
            "adapter": row["adapter"],
            "message": row["message"],
            "progress": None,
            "report": row["report"],
        }
        if row["status"] == "running":
            if srv.jobs.current is not None and srv.jobs.current.id == row["id"]:
                out["progress"] = _progress(srv.jobs.current.progress) | {"stage": srv.jobs.current.status}
            else:
                out["progress"] = _progress(srv.datasets.progress.get(row["id"], {}))
        return out

    def get_row(job_id: str) -> dict:
        row = srv.store.job(job_id)
        if row is None:
            raise ApiError(404, f"no job {job_id!r} (GET /v1/jobs lists them)", param="id")
        return row

    @app.post("/v1/jobs", status_code=202)
    async def submit(req: JobRequest) -> dict:
        if req.source == "feedback":
            if req.dataset or req.validation or req.settings or req.name or req.parent:
                raise ApiError(400, "a feedback job takes its settings from [learning]; give only source", "source")
            job_id, msg = srv.jobs.submit("api")
            if job_id is None:
                raise ApiError(409, msg, param="source")
            row = srv.store.job(job_id)
            return job_view(row) if row else {"object": "training.job", "id": job_id, "status": "queued"}
        job_id = srv.datasets.submit(req.model_dump(exclude={"source"}))
        return job_view(get_row(job_id))

    @app.get("/v1/jobs")
    async def list_jobs(limit: int = 50) -> dict:
        return {"object": "list", "data": [job_view(r) for r in srv.store.jobs(max(1, min(limit, 1000)))]}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict:
        return job_view(get_row(job_id))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict:
        row = get_row(job_id)
        if row["status"] not in ("queued", "running"):
            raise ApiError(409, f"job {job_id} already finished ({API_STATUS.get(row['status'], row['status'])})")
        if row["kind"] == "feedback":
            current = srv.jobs.current.id if srv.jobs.current else None
            queued = srv.jobs.queued[1] if srv.jobs.queued else None
            if job_id not in (current, queued):
                raise ApiError(409, f"job {job_id} belongs to another process on this home", param="id")
            if job_id == queued and current is not None:
                srv.jobs.drop_queued("cancelled before it started; the feedback stays in the buffer")
            else:
                await srv.jobs.cancel()
        else:
            await srv.datasets.cancel(job_id)
        return job_view(get_row(job_id))

    @app.post("/v1/jobs/{job_id}/resume", status_code=202)
    async def resume_job(job_id: str) -> dict:
        get_row(job_id)
        srv.datasets.resume(job_id)
        return job_view(get_row(job_id))

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        row = get_row(job_id)

        async def stream():
            if row["status"] not in ("queued", "running") and row["id"] not in srv.hub.history:
                end = {"event": "finished", "status": API_STATUS.get(row["status"], row["status"])}
                yield f"data: {json.dumps(end | {'adapter': row['adapter'], 'message': row['message']})}\n\n"
                return
            async for ev in srv.hub.follow(job_id):
                if ev.get("event") == "finished":
                    ev = ev | {"status": API_STATUS.get(ev.get("status"), ev.get("status"))}
                yield f"data: {json.dumps(ev)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def _system(messages: list[dict]) -> str | None:
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else None


def _progress(ev: dict) -> dict:
    keys = ("epoch", "step", "total_steps", "loss", "eval_loss", "eta_s", "tokens_per_s", "rss_mb")
    return {k: ev.get(k) for k in keys}


class StopMatcher:
    """OpenAI ``stop`` strings on streamed text: text is passed on as it comes, except a tail that
    could still be the start of a stop string; once one appears, the text before it is the end."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
