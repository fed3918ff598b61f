"""``chelsea serve``: an OpenAI-shaped HTTP server whose documents are compressed once and reused.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text),
``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` as
server-sent events) and ``POST /v1/documents`` (register a long text once; answer questions about
it later by naming it).

Compression is chosen when the server starts (``--method``, ``--ratio``) and may be changed per
request with the extra body field ``"chelsea": {"method": ..., "ratio": ..., "document": ID}``
(the openai client sends it with ``extra_body``). Decoding is greedy.

Reuse: a registered document is prefilled and compressed once (query-agnostic: the question is not
known yet, which is what ``chelsea`` and ``kvzip`` are built for); every request that names it, or
whose prompt starts with exactly its tokens, starts from a copy of that compressed cache and only
reads its own remaining tokens. Documents are kept in least-recently-used order within
``--reuse-gib`` of KV memory.

Requests are decoded together by the :class:`chelsea.serving.engine.Engine`: up to ``--max-batch``
sequences within ``--kv-budget-gib`` of KV cache run in one batch, new ones joining between steps;
at most ``--max-queue`` more wait, beyond that requests are answered 429. A streaming client that
disconnects frees its sequence at the next step. Bad input is answered with an OpenAI-style error
body and a 4xx status.

Not built on ``transformers serve``: it picks the KV cache by name (``cache_implementation``) or
runs its own paged cache under continuous batching, with no supported way to pass a
:class:`chelsea.ClusteredCache` per request, and it keeps no cache between requests.

Not yet: sampling (temperature is accepted and ignored: replies are greedy).
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import ChelseaError
from ..models import check_prompt_length
from .engine import Engine
from .protocol import Job, ServeError


# Request bodies: unknown fields are refused (extra="forbid"), as a misspelt option should be.

class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str

class Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int = Field(64, ge=1)
    stream: bool = False
    temperature: float | None = None
    chelsea: dict | None = None

class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)

class CompletionRequest(Common):
    prompt: str

class DocumentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    chelsea: dict | None = None


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI application around ``engine``."""
    app = FastAPI(title="chelsea", version=__version__)

    @app.exception_handler(ServeError)
    async def _serve_error(request, err: ServeError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ChelseaError)
    async def _chelsea_error(request, err: ChelseaError):
        return JSONResponse(ServeError(400, str(err)).body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request body (JSON expected)")
        return JSONResponse(ServeError(400, message, param=where).body(), status_code=400)

    def check_model(name: str) -> None:
        if name != model_name:
            raise ServeError(404, f"model {name!r} is not served here; this server serves {model_name!r}", param="model")

    def start(req: Common, ids_for) -> Job:
        check_model(req.model)
        method, ratio, document = engine.settings(req.chelsea)
        return engine.submit(Job(ids_for(document), method, ratio, req.max_tokens, document))

    async def tokens(job: Job, request: Request):
        """The job's token ids as they come; stops the job if the client goes away."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await loop.run_in_executor(None, job.tokens.get)
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
                if await request.is_disconnected():
                    return
        finally:  # also when the response stops being read (the client went away): the worker stops
            job.cancelled.set()

    def respond(job: Job, request: Request, stream: bool, chat: bool):
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{next(engine.ids)}"
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if chat:
                body = {"delta": {"content": text} if text else {}} if delta else {"message": {"role": "assistant", "content": text}}
                return {"index": 0, **body, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        if stream:
            async def events():
                ids, sent = [], ""
                stream = tokens(job, request)
                try:
                    async for token in stream:
                        ids.append(token)
                        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
                        piece, sent = text[len(sent):], text
                        if piece:
                            chunk = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                                     "model": model_name, "choices": [choice(piece, None, True)]}
                            yield f"data: {json.dumps(chunk)}\n\n"
                    finish = "length" if len(ids) >= job.max_tokens else "stop"
                    end = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": model_name,
                           "choices": [choice("", finish, True)]}
                    yield f"data: {json.dumps(end)}\n\n"
                except ServeError as err:
                    yield f"data: {json.dumps(err.body())}\n\n"
                finally:
                    await stream.aclose()  # sets the job's cancel flag if it is still running
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async def whole():
            ids = [t async for t in tokens(job, request)]
            text = engine.tokenizer.decode(ids, skip_special_tokens=True)
            finish = "length" if len(ids) >= job.max_tokens else "stop"
            usage = {"prompt_tokens": len(job.ids), "completion_tokens": len(ids), "total_tokens": len(job.ids) + len(ids)}
            return {"id": rid, "object": kind, "created": created, "model": model_name,
                    "choices": [choice(text, finish, False)], "usage": usage}

        return whole()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_depth": engine.scheduler.depth}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "chelsea"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        job = start(req, lambda doc: engine.chat_ids([m.model_dump() for m in req.messages], doc))
        out = respond(job, request, req.stream, chat=True)
        return out if req.stream else await out

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        job = start(req, lambda doc: engine.completion_ids(req.prompt, doc))
        out = respond(job, request, req.stream, chat=False)
        return out if req.stream else await out

    @app.post("/v1/documents")
    async def documents(req: DocumentRequest):
        method, ratio, _ = engine.settings(req.chelsea)
        check_prompt_length(engine.model.config, len(engine.document_ids(req.text)), 1)
        loop = asyncio.get_running_loop()
        name, count = await loop.run_in_executor(None, engine.register, req.text, method, ratio)
        doc = engine.documents[name]
        return {"id": name, "object": "document", "tokens": count, "method": method, "ratio": ratio, "kv_bytes": doc.nbytes}

    return app
