"""``chelsea serve``: an OpenAI-compatible HTTP server whose documents are compressed once and reused.

Endpoints: ``GET /health``, ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /metrics``
(Prometheus text), ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both streamed as
server-sent events with ``"stream": true``), ``POST /v1/documents`` (register a long text once;
ask about it later by naming it in the extra body field ``"chelsea": {"document": ID}``, which
also takes ``method`` and ``ratio``).

The parameters are OpenAI's (:mod:`.schema`): sampling with ``temperature`` (1 when left out, as
OpenAI; 0 is greedy), ``top_p``, ``seed`` (the same seed gives the same answer), ``stop``, ``n``,
``max_tokens`` / ``max_completion_tokens``, presence and frequency penalties,
``stream_options.include_usage``; what cannot be honoured is a clear 400. Every error is an
OpenAI-style body (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status: 400 for
bad input, 404 for an unknown model, route or document, 405, 413 for a body over ``max_body``
(refused before it is read), 415 for a body that is not JSON, 429 with ``Retry-After`` when every
place is taken. Tokenizing runs off the event loop and the engine prefills on its own thread, so
``/health`` and running streams keep answering during a long request.

Not built on ``transformers serve``: it picks the KV cache by name or runs its own paged cache,
with no supported way to pass a :class:`chelsea.ClusteredCache` per request, and keeps no cache
between requests.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import ChelseaError
from .engine import Engine
from .protocol import Job, Sampling, ServeError
from .schema import ChatRequest, CompletionRequest, DocumentRequest, check_text, refusals
from .text import TextStream

MAX_BODY = 8 << 20
DEFAULT_MAX_TOKENS = 64  # when a request sets neither max_tokens nor max_completion_tokens (at most the server's limit)


def _error(err: ServeError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (by its Content-Length before
    anything is read, else while it streams in), 415 for a POST body that says it is not JSON."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if kind not in (b"application/json", b""):
            return await _error(ServeError(415, "send the body as JSON (content-type: application/json)"))(scope, receive, send)
        too_big = ServeError(413, f"the request body is larger than the server takes ({self.limit} bytes)")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await _error(too_big)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await _error(too_big)(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _validation_error(err: RequestValidationError) -> ServeError:
    first = err.errors()[0] if err.errors() else {}
    loc = [str(p) for p in first.get("loc", ())[1:]]
    if first.get("type") == "json_invalid":
        return ServeError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'cannot be parsed')})")
    where = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return ServeError(400, f"unknown parameter {where}", param=where)
    message = first.get("msg", "invalid request body")
    return ServeError(400, f"{where}: {message}" if where else f"the request body is invalid: {message}", param=where)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as an OpenAI error body."""

    @app.exception_handler(ServeError)
    async def _serve_error(request, err: ServeError):
        return _error(err)

    @app.exception_handler(ChelseaError)
    async def _chelsea_error(request, err: ChelseaError):
        return _error(ServeError(400, str(err)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        return _error(_validation_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(ServeError(err.status_code, message.get(err.status_code, str(err.detail)), headers=dict(err.headers or {})))


def create_app(engine: Engine, model_name: str, *, max_body: int = MAX_BODY) -> FastAPI:
    """The FastAPI application around ``engine``; bodies over ``max_body`` bytes are refused (413)."""
    app = FastAPI(title="chelsea", version=__version__)
    app.add_middleware(BodyLimit, limit=max_body)

    _install_error_handlers(app)

    def check_model(name: str) -> None:
        if name != model_name:
            raise ServeError(404, f"model {name!r} is not served here; this server serves {model_name!r}", param="model")

    async def answer(req, ids_for, request: Request, chat: bool):
        """Check ``req``, tokenize its prompt off the event loop, submit one job per choice and reply."""
        check_model(req.model)
        check_text(req.model_dump(exclude_none=True))
        refusals(req)
        method, ratio, document = engine.settings(req.chelsea.model_dump() if req.chelsea else None)
        try:
            ids = await run_in_threadpool(ids_for, document)
        except KeyError:  # the document left the store meanwhile
            raise ServeError(404, f"no document {document!r}: register it again", param="chelsea.document") from None
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or min(DEFAULT_MAX_TOKENS, engine.scheduler.max_tokens_limit)
        temperature = 1.0 if req.temperature is None else req.temperature
        jobs = [Job(ids, method, ratio, max_tokens, document,
                    sampling=Sampling(temperature, 1.0 if req.top_p is None else req.top_p,
                                      None if req.seed is None else req.seed + i, req.presence_penalty or 0.0,
                                      req.frequency_penalty or 0.0))
                for i in range(req.n or 1)]
        reply = _Answer(engine, model_name, jobs, req, request, chat)  # listening before the first token can come
        for i, job in enumerate(jobs):
            try:
                engine.submit(job)
            except ServeError:
                for started in jobs[:i]:
                    started.cancelled.set()
                raise
        return reply.stream() if req.stream else await reply.whole()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_depth": engine.scheduler.depth, "active": engine.scheduler.active}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "chelsea"}]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "chelsea"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text(f"messages.{i}")} for i, m in enumerate(req.messages)]
        return await answer(req, lambda doc: engine.chat_ids(messages, doc), request, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ServeError(400, "this server takes one prompt per request (n gives several answers)", param="prompt")
            prompt = prompt[0]
        return await answer(req, lambda doc: engine.completion_ids(prompt, doc), request, chat=False)

    @app.post("/v1/documents")
    async def documents(req: DocumentRequest):
        check_text(req.text, "text")
        method, ratio, _ = engine.settings(req.chelsea.model_dump() if req.chelsea else None)
        ids = await run_in_threadpool(engine.document_ids, req.text)
        name = await run_in_threadpool(engine.register_ids, ids, method, ratio)
        return {"id": name, "object": "document", "tokens": len(ids), "method": method, "ratio": ratio,
                "kv_bytes": engine.documents[name].nbytes}

    return app


class _Answer:
    """The reply to one request: its ``n`` jobs' tokens as text, whole or as server-sent events."""

    def __init__(self, engine: Engine, model_name: str, jobs: list[Job], req, request: Request, chat: bool):
        self.engine, self.model_name, self.jobs, self.req, self.request, self.chat = engine, model_name, jobs, req, request, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{next(engine.ids)}"
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"
        self.texts = [TextStream(engine.tokenizer, req.stops()) for _ in jobs]
        self.counts = [0] * len(jobs)
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, job in enumerate(jobs):
            job.listener = lambda item, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, item))

    def _finish_reason(self, i: int) -> str:
        return "stop" if self.texts[i].stopped or self.counts[i] < self.jobs[i].max_tokens else "length"

    def _usage(self) -> dict:
        prompt = len(self.jobs[0].ids)
        return {"prompt_tokens": prompt, "completion_tokens": sum(self.counts), "total_tokens": prompt + sum(self.counts)}

    async def pieces(self):
        """``(choice, text, finished)`` as the tokens come; stops every job when the client leaves."""
        open_ = set(range(len(self.jobs)))
        try:
            while open_:
                i, item = await self.queue.get()
                if i not in open_:
                    continue
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    open_.discard(i)
                    yield i, self.texts[i].finish(), True
                    continue
                self.counts[i] += 1
                piece = self.texts[i].add(item)
                if self.texts[i].stopped:
                    self.jobs[i].cancelled.set()
                    open_.discard(i)
                    yield i, piece, True
                elif piece:
                    yield i, piece, False
                if await self.request.is_disconnected():
                    return
        finally:  # also when the response stops being read (the client went away): the workers stop
            for job in self.jobs:
                job.cancelled.set()

    def _choice(self, i: int, text: str, finish: str | None, delta: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        if delta:
            body = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": i, "delta": body, "logprobs": None, "finish_reason": finish}
        return {"index": i, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
                "finish_reason": finish}

    def _chunk(self, choices: list[dict], usage: bool) -> str:
        body = {"id": self.id, "object": self.kind + ".chunk" if self.chat else self.kind, "created": self.created,
                "model": self.model_name, "choices": choices}
        if usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    async def whole(self) -> dict:
        parts = [[] for _ in self.jobs]
        async for i, piece, _ in self.pieces():
            parts[i].append(piece)
        choices = [self._choice(i, "".join(p), self._finish_reason(i), delta=False) for i, p in enumerate(parts)]
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model_name, "choices": choices,
                "usage": self._usage()}

    def stream(self) -> StreamingResponse:
        usage = bool(self.req.stream_options and self.req.stream_options.include_usage)

        async def events():
            if self.chat:
                yield self._chunk([self._choice(i, "", None, True, first=True) for i in range(len(self.jobs))], usage)
            try:
                async for i, piece, finished in self.pieces():
                    if piece:
                        yield self._chunk([self._choice(i, piece, None, True)], usage)
                    if finished:
                        yield self._chunk([self._choice(i, "", self._finish_reason(i), True)], usage)
                if usage:
                    body = {"id": self.id, "object": self.kind + ".chunk" if self.chat else self.kind, "created": self.created,
                            "model": self.model_name, "choices": [], "usage": self._usage()}
                    yield f"data: {json.dumps(body)}\n\n"
            except ServeError as err:
                yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
