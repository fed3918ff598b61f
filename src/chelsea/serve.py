"""``chelsea serve``: an OpenAI-shaped HTTP server whose documents are compressed once and reused.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text),
``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` as
server-sent events) and ``POST /v1/documents`` (register a long text once; answer questions about
it later by naming it).

Compression is chosen when the server starts (``--method``, ``--ratio``) and may be changed per
request with the extra body field ``"chelsea": {"method": ..., "ratio": ..., "document": ID}``
(the openai client sends it with ``extra_body``). Decoding is greedy.

Reuse: a registered document is prefilled and compressed once (query-agnostic: the question is not
known yet, which is what ``guided`` and ``kvzip`` are built for); every request that names it, or
whose prompt starts with exactly its tokens, starts from a copy of that compressed cache and only
reads its own remaining tokens. Documents are kept in least-recently-used order within
``--reuse-bytes`` of KV memory.

Requests are served one at a time by one worker thread, in arrival order; at most ``--max-queue``
wait, more are answered 429. A streaming client that disconnects stops its generation at the next
token. Bad input is answered with an OpenAI-style error body and a 4xx status.

Not yet: decoding several requests together in one batch; sampling (temperature is accepted and
ignored: replies are greedy).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .compat import cache_arg
from .config import CompressionConfig
from .errors import ChelseaError
from .generation import METHODS, make_cache, use_method
from .importance import compress_context
from .prompts import chat_frame
from .support import check_prompt_length


SERVABLE_METHODS = tuple(m for m in METHODS if m != "clustergen")  # clustergen takes no ratio


class ServeError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Job:
    """One request's work: prompt ids, settings, where its tokens go."""

    ids: list[int]
    method: str
    ratio: float
    max_tokens: int
    document: str | None = None
    register: bool = False  # prefill and keep as a document instead of answering
    tokens: queue.Queue = field(default_factory=queue.Queue)  # token ids, then None; or a ServeError
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Document:
    ids: list[int]
    method: str
    ratio: float
    cache: object
    nbytes: int


class Engine:
    """The model, its compressed documents and the worker thread that runs every request."""

    def __init__(self, model, tokenizer, *, method: str = "guided", ratio: float = 0.8, max_queue: int = 16,
                 reuse_bytes: int = 8 << 30, max_tokens_limit: int = 1024):
        self.model, self.tokenizer = model, tokenizer
        self.method, self.ratio = method, ratio
        self.reuse_bytes, self.max_tokens_limit = reuse_bytes, max_tokens_limit
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.documents: OrderedDict[str, Document] = OrderedDict()
        self.counters = {"requests_total": 0, "prefills_total": 0, "document_hits_total": 0, "generated_tokens_total": 0,
                         "rejected_total": 0}
        self._ids = itertools.count(1)
        self.active = 0  # requests being generated now (the worker runs one at a time)
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, daemon=True, name="chelsea-serve-worker")
        self._worker.start()

    # Requests -----------------------------------------------------------------------------------

    def settings(self, extra: dict | None) -> tuple[str, float, str | None]:
        extra = dict(extra or {})
        method, ratio, document = extra.pop("method", self.method), extra.pop("ratio", self.ratio), extra.pop("document", None)
        if extra:
            raise ServeError(400, f"unknown chelsea settings: {', '.join(sorted(extra))} (known: method, ratio, document)", param="chelsea")
        if method not in SERVABLE_METHODS:
            raise ServeError(400, f"method must be one of {', '.join(SERVABLE_METHODS)}; got {method!r}", param="chelsea.method")
        try:
            CompressionConfig(ratio=ratio)
        except ChelseaError as err:
            raise ServeError(400, str(err), param="chelsea.ratio") from err
        if document is not None and document not in self.documents:
            raise ServeError(404, f"no document {document!r}: register it with POST /v1/documents first", param="chelsea.document")
        return method, float(ratio), document

    def submit(self, job: Job) -> Job:
        if job.max_tokens > self.max_tokens_limit:
            raise ServeError(400, f"max_tokens is at most {self.max_tokens_limit}; got {job.max_tokens}", param="max_tokens")
        limit = self.model.config.max_position_embeddings
        if not job.register and len(job.ids) + job.max_tokens > limit:
            raise ServeError(400, f"the prompt has {len(job.ids)} tokens and asks for {job.max_tokens} more; "
                                  f"the model takes {limit} in all: shorten the prompt or max_tokens", param="messages")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.counters["rejected_total"] += 1
            raise ServeError(429, "the server is busy: too many requests are waiting; retry later", kind="rate_limit_error") from None
        self.counters["requests_total"] += 1
        return job

    def register(self, text: str, method: str, ratio: float) -> tuple[str, int]:
        """Prefill and compress a document once (on the worker thread); returns its id and token count."""
        ids = self.document_ids(text)
        job = self.submit(Job(ids, method, ratio, 0, register=True))
        result = job.tokens.get()
        if isinstance(result, Exception):
            raise result
        return result, len(ids)

    # Prompts ------------------------------------------------------------------------------------

    def document_ids(self, text: str) -> list[int]:
        """A document as the start of a user message (so a question about it can follow)."""
        head, _ = chat_frame(self.tokenizer)
        return self.tokenizer(head + text, add_special_tokens=not head).input_ids

    def chat_ids(self, messages: list[dict], document: str | None) -> list[int]:
        if document is not None:  # the document opens the first user message; the rest follows it
            _, tail = chat_frame(self.tokenizer)
            question = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
            return self.documents[document].ids + self.tokenizer("\n\n" + question + tail, add_special_tokens=False).input_ids
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer("\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:").input_ids

    def completion_ids(self, prompt: str, document: str | None) -> list[int]:
        if document is not None:
            return self.documents[document].ids + self.tokenizer(prompt, add_special_tokens=False).input_ids
        return self.tokenizer(prompt).input_ids

    # The worker ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            self.active = 1
            try:
                with torch.inference_mode():
                    if job.register:
                        job.tokens.put(self._register(job))
                    else:
                        self._generate(job)
            except Exception as err:  # noqa: BLE001 - any failure goes back to its request, the worker lives on
                job.tokens.put(err if isinstance(err, ServeError) else ServeError(500, f"generation failed: {err}", kind="server_error"))
            finally:
                self.active = 0

    def _new_cache(self, method: str, ratio: float):
        use_method(self.model, method)
        return make_cache(method, CompressionConfig(ratio=ratio) if method != "full" else None)

    def _prefill(self, cache, ids: torch.Tensor):
        """Prefill and compress (scored first for importance-ranked methods; any cache works)."""
        self.counters["prefills_total"] += 1
        return compress_context(self.model, cache, ids, self.tokenizer)

    def _register(self, job: Job) -> str:
        cache = self._new_cache(job.method, job.ratio)
        self._prefill(cache, torch.tensor([job.ids], device=self.model.device))
        nbytes = _cache_bytes(cache)
        name = f"doc-{next(self._ids)}"
        self.documents[name] = Document(job.ids, job.method, job.ratio, cache, nbytes)
        while len(self.documents) > 1 and sum(d.nbytes for d in self.documents.values()) > self.reuse_bytes:
            self.documents.popitem(last=False)
        return name

    def _reusable(self, job: Job) -> Document | None:
        """The named document, or the longest one whose tokens start this prompt (same settings)."""
        if job.document is not None:
            return self.documents.get(job.document)
        best = None
        for doc in self.documents.values():
            if (doc.method, doc.ratio) == (job.method, job.ratio) and len(doc.ids) < len(job.ids) \
                    and job.ids[: len(doc.ids)] == doc.ids and (best is None or len(doc.ids) > len(best.ids)):
                best = doc
        return best

    def _generate(self, job: Job) -> None:
        device = self.model.device
        doc = self._reusable(job)
        if doc is not None:
            name = next(k for k, v in self.documents.items() if v is doc)
            self.documents.move_to_end(name)
            self.counters["document_hits_total"] += 1
            cache = copy.deepcopy(doc.cache)
            use_method(self.model, doc.method)
            rest = torch.tensor([job.ids[len(doc.ids) :]], device=device)
            logits = self.model(rest, **cache_arg(self.model, cache), use_cache=True, logits_to_keep=1).logits
        else:
            cache = self._new_cache(job.method, job.ratio)
            logits = self._prefill(cache, torch.tensor([job.ids], device=device))
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        token = int(logits[0, -1].argmax())
        for produced in range(job.max_tokens):
            if job.cancelled.is_set():
                break
            if token in eos:
                break
            job.tokens.put(token)
            self.counters["generated_tokens_total"] += 1
            if produced + 1 == job.max_tokens:
                break
            step = torch.tensor([[token]], device=device)
            token = int(self.model(step, **cache_arg(self.model, cache), use_cache=True, logits_to_keep=1).logits[0, -1].argmax())
        job.tokens.put(None)

    def metrics(self) -> str:
        lines = []
        values = {**self.counters, "queue_depth": self.jobs.qsize(), "active_requests": self.active, "documents": len(self.documents),
                  "document_kv_bytes": sum(d.nbytes for d in self.documents.values())}
        for name, value in values.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE chelsea_{name} {kind}", f"chelsea_{name} {value}"]
        return "\n".join(lines) + "\n"


def _cache_bytes(cache) -> int:
    from .generation import cache_stats

    return int(cache_stats(cache)["kv_bytes"])


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
    app = FastAPI(title="chelsea", version="0.1.0")

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
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{next(engine._ids)}"
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
        return {"status": "ok", "model": model_name, "queue_depth": engine.jobs.qsize()}

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
