"""The serving engine: requests decoded together in one running batch, documents compressed once.

One worker thread owns the model. It loops:

1. **admit** waiting requests, oldest first, while the running batch has room (``max_batch``
   sequences and ``kv_budget`` bytes of KV cache, padding included). A new request is prefilled and
   compressed on its own (or starts from a copy of a registered document's compressed cache and
   reads only its remaining tokens), gets its first token, and its cache rows join the running
   batch of its method and ratio (:meth:`chelsea.cache.ClusteredCache.append_rows`);
2. **step** every running batch by one token: one forward pass for all its rows, each row at its
   own position; rows that are done (length, end of sequence, client gone) leave the batch and
   their memory is freed (:meth:`~chelsea.cache.ClusteredCache.keep_rows`).

Every row is clustered on its own schedule, exactly as it would be alone, so a request's answer
does not depend on what else runs beside it. The full cache is a :class:`ClusteredCache` with
ratio 0 (same buffers and attention), so it batches the same way.

Waiting requests sit in a queue of ``max_queue``; :meth:`Engine.submit` raises a 429
:class:`ServeError` when it is full. This module needs no web framework; :mod:`chelsea.serve`
puts HTTP in front of it and ``benchmarks/serve_load.py`` drives it directly.
"""

from __future__ import annotations

import copy
import itertools
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .cache import ClusteredCache
from .compat import cache_arg
from .config import CompressionConfig
from .errors import ChelseaError
from .generation import METHODS, use_method
from .importance import compress_context
from .methods import COMPRESSORS
from .prompts import chat_frame

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
    """One request's work: prompt ids, settings, where its tokens go.

    ``tokens`` receives the generated token ids one by one, then ``None`` (or a
    :class:`ServeError`). ``ignore_eos`` generates ``max_tokens`` whatever comes (benchmarks).
    """

    ids: list[int]
    method: str
    ratio: float
    max_tokens: int
    document: str | None = None
    register: bool = False  # prefill and keep as a document instead of answering
    ignore_eos: bool = False
    tokens: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Document:
    ids: list[int]
    method: str
    ratio: float
    cache: ClusteredCache
    nbytes: int


@dataclass
class _Row:
    """A running request: the token to emit and feed next, how many it produced, its KV estimate."""

    job: Job
    token: int
    produced: int
    entries: int  # most KV entries per layer this row will hold


@dataclass
class _Batch:
    """The running rows of one (method, ratio); row ``i`` of ``cache`` belongs to ``rows[i]``."""

    cache: ClusteredCache
    rows: list[_Row] = field(default_factory=list)


class Engine:
    """The model, its compressed documents and the worker thread that batches every request.

    Requests on one document with questions of one length start ``ADMIT_ROWS`` at a time in one
    forward pass (more would save little time and hold more copies of the document at once).

    Args:
        method, ratio: compression of requests that do not ask for another.
        max_queue: requests that may wait for a place in the batch; more are refused (429).
        reuse_bytes: KV memory for registered documents (least recently used dropped first).
        max_tokens_limit: largest ``max_tokens`` a request may ask for.
        max_batch: sequences decoded together at most.
        kv_budget: KV bytes the running sequences may hold together (``None``: no limit). A request
            is admitted only when its estimated peak fits beside the others'.
    """

    ADMIT_ROWS = 8

    def __init__(self, model, tokenizer, *, method: str = "chelsea", ratio: float = 0.8, max_queue: int = 16,
                 reuse_bytes: int = 8 << 30, max_tokens_limit: int = 1024, max_batch: int = 16,
                 kv_budget: int | None = None):
        if max_batch < 1:
            raise ChelseaError(f"max_batch must be at least 1; got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.method, self.ratio = method, ratio
        self.reuse_bytes, self.max_tokens_limit = reuse_bytes, max_tokens_limit
        self.max_batch, self.kv_budget = max_batch, kv_budget
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.documents: OrderedDict[str, Document] = OrderedDict()
        self.counters = {"requests_total": 0, "prefills_total": 0, "document_hits_total": 0, "generated_tokens_total": 0,
                         "rejected_total": 0, "decode_steps_total": 0}
        self._ids = itertools.count(1)
        self._batches: dict[tuple[str, float], _Batch] = {}
        self._closing = False
        self._waiting: Job | None = None  # the oldest request, taken from the queue, waiting for room
        self.peak_running = 0  # most requests decoded together so far
        self.peak_kv_bytes = 0  # most KV bytes the running batches held (sampled when rows join)
        use_method(model, "chelsea")  # every cache here is a ClusteredCache (full: ratio 0)
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._worker = threading.Thread(target=self._run, daemon=True, name="chelsea-serve-worker")
        self._worker.start()

    # Requests -----------------------------------------------------------------------------------

    def settings(self, extra: dict | None) -> tuple[str, float, str | None]:
        """The method, ratio and document a request's ``chelsea`` field asks for (checked)."""
        extra = dict(extra or {})
        document = extra.pop("document", None)
        if document is not None and document in self.documents:  # a document is read as it was compressed
            doc = self.documents[document]
            if extra.get("method", doc.method) != doc.method or float(extra.get("ratio", doc.ratio)) != doc.ratio:
                raise ServeError(400, f"document {document!r} is compressed with {doc.method} at ratio {doc.ratio}; "
                                      "leave method and ratio out or register it again with yours", param="chelsea.document")
            extra.setdefault("method", doc.method)
            extra.setdefault("ratio", doc.ratio)
        method, ratio = extra.pop("method", self.method), extra.pop("ratio", self.ratio)
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
        """Queue ``job``; 400 if it can never run, 429 if the queue is full, 503 once closing."""
        if self._closing:
            raise ServeError(503, "the server is shutting down", kind="server_error")
        if job.max_tokens > self.max_tokens_limit:
            raise ServeError(400, f"max_tokens is at most {self.max_tokens_limit}; got {job.max_tokens}", param="max_tokens")
        limit = self.model.config.max_position_embeddings
        if not job.register and len(job.ids) + job.max_tokens > limit:
            raise ServeError(400, f"the prompt has {len(job.ids)} tokens and asks for {job.max_tokens} more; "
                                  f"the model takes {limit} in all: shorten the prompt or max_tokens", param="messages")
        if not job.register and self.kv_budget is not None:
            need = self._entries(job) * self._entry_bytes(job.method)
            if need > self.kv_budget:
                raise ServeError(400, f"this request needs about {need / 2**20:.0f} MiB of KV cache, more than the server's "
                                      f"budget of {self.kv_budget / 2**20:.0f} MiB: shorten the prompt or ask for a higher ratio",
                                 param="messages")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.counters["rejected_total"] += 1
            raise ServeError(429, "the server is busy: too many requests are waiting; retry later", kind="rate_limit_error") from None
        self.counters["requests_total"] += 1
        return job

    def register(self, text: str, method: str, ratio: float) -> tuple[str, int]:
        """Prefill and compress a document once; returns its id and token count."""
        ids = self.document_ids(text)
        return self.register_ids(ids, method, ratio), len(ids)

    def register_ids(self, ids: list[int], method: str, ratio: float) -> str:
        """:meth:`register` for a document already tokenized; returns its id."""
        job = self.submit(Job(ids, method, ratio, 0, register=True))
        result = job.tokens.get()
        if isinstance(result, Exception):
            raise result
        return result

    # Prompts ------------------------------------------------------------------------------------

    def document_ids(self, text: str) -> list[int]:
        """A document as the start of a user message (so a question about it can follow)."""
        head, _ = chat_frame(self.tokenizer)
        return self.tokenizer(head + text, add_special_tokens=not head).input_ids

    def question_ids(self, question: str) -> list[int]:
        """What follows a registered document: the question and the end of the user turn."""
        _, tail = chat_frame(self.tokenizer)
        return self.tokenizer("\n\n" + question + tail, add_special_tokens=False).input_ids

    def chat_ids(self, messages: list[dict], document: str | None) -> list[int]:
        if document is not None:  # the document opens the first user message; the rest follows it
            question = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
            return self.documents[document].ids + self.question_ids(question)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer("\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:").input_ids

    def completion_ids(self, prompt: str, document: str | None) -> list[int]:
        if document is not None:
            return self.documents[document].ids + self.tokenizer(prompt, add_special_tokens=False).input_ids
        return self.tokenizer(prompt).input_ids

    # Memory estimates ---------------------------------------------------------------------------

    def _config(self, method: str, ratio: float) -> CompressionConfig:
        return CompressionConfig(ratio=0.0 if method == "full" else ratio)

    def _entries(self, job: Job) -> int:
        """Most KV entries per layer ``job`` will hold: its budget, plus what decoding adds
        before the next clustering."""
        cfg = self._config(job.method, job.ratio)
        tokens = len(job.ids) + job.max_tokens
        return min(tokens, cfg.budget(tokens) + cfg.compress_every)

    def _entry_bytes(self, method: str) -> int:
        """Bytes one KV entry takes over all layers: keys, values, log-count (and score)."""
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        width = torch.finfo(self.model.dtype).bits // 8
        scored = method != "full" and (getattr(COMPRESSORS[method], "uses_importance", False)
                                       or getattr(COMPRESSORS[method], "uses_attention", False))
        return cfg.num_hidden_layers * kv_heads * (2 * head_dim * width + 4 * (1 + scored))

    def _projected_bytes(self, extra: list[Job]) -> int:
        """KV bytes of the running batches at their peak (rows padded to the longest), with the
        rows of the requests ``extra`` added."""
        rows: dict[tuple[str, float], list[int]] = {key: [r.entries for r in b.rows] for key, b in self._batches.items()}
        for job in extra:
            rows.setdefault((job.method, job.ratio), []).append(self._entries(job))
        return sum(len(r) * max(r) * self._entry_bytes(key[0]) for key, r in rows.items() if r)

    def _fits(self, job: Job, admitted: list[Job]) -> bool:
        """Whether ``job`` fits beside the running requests and those ``admitted`` this round."""
        running = self.running + len(admitted)
        if running == 0:
            return True
        if running >= self.max_batch:
            return False
        return self.kv_budget is None or self._projected_bytes([*admitted, job]) <= self.kv_budget

    # The worker ---------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests being generated now."""
        return sum(len(b.rows) for b in self._batches.values())

    def close(self) -> None:
        """Stop the worker after what runs and waits now (new requests are refused meanwhile)."""
        self._closing = True
        self.jobs.put(_STOP)  # wakes a worker that waits for requests; comes after every queued one
        self._worker.join()

    def _run(self) -> None:
        while not (self._closing and self.running == 0 and self._waiting is None and self.jobs.empty()):
            try:
                with torch.inference_mode():
                    self._admit()
                    for key in list(self._batches):
                        self._step(key)
            except Exception as err:  # noqa: BLE001 - a failed step ends its requests, never the worker
                for batch in self._batches.values():
                    for row in batch.rows:
                        row.job.tokens.put(_as_serve_error(err))
                self._batches.clear()

    def _next_job(self, block: bool) -> Job | None:
        if self._waiting is not None:
            job, self._waiting = self._waiting, None
            return job
        try:
            job = self.jobs.get(block=block)
        except queue.Empty:
            return None
        return None if job is _STOP else job

    def _admit(self) -> None:
        """Start waiting requests, oldest first, while they fit; block while nothing runs."""
        admitted: list[Job] = []
        while (job := self._next_job(block=self.running == 0 and not admitted)) is not None:
            if job.cancelled.is_set():
                job.tokens.put(None)
                continue
            if job.register:  # in arrival order: what came before starts first
                self._start_all(admitted)
                admitted = []
                self._guarded([job], lambda: job.tokens.put(self._register(job)))
                continue
            if not self._fits(job, admitted):
                self._waiting = job
                break
            admitted.append(job)
        self._start_all(admitted)

    def _guarded(self, jobs: list[Job], work) -> None:
        """Run ``work``; if it fails, the failure goes back to ``jobs`` and the worker goes on."""
        try:
            work()
        except Exception as err:  # noqa: BLE001
            for job in jobs:
                job.tokens.put(_as_serve_error(err))

    def _start_all(self, jobs: list[Job]) -> None:
        """Start admitted requests: those on the same document with questions of the same length
        together (one forward for all), the others one by one."""
        together: dict[tuple, list[Job]] = {}
        for job in jobs:
            found = self._reusable(job)
            if found is None:
                self._guarded([job], lambda job=job: self._start(job))
            else:
                together.setdefault((found[0], len(job.ids)), []).append(job)
        for (name, _), group in together.items():
            for i in range(0, len(group), self.ADMIT_ROWS):
                part = group[i : i + self.ADMIT_ROWS]
                self._guarded(part, lambda name=name, part=part: self._start_on_document(name, part))

    def _new_cache(self, method: str, ratio: float) -> ClusteredCache:
        compressor = COMPRESSORS["chelsea-paper" if method == "full" else method]
        return ClusteredCache(self._config(method, ratio), compressor=compressor)

    def _prefill(self, cache, ids: list[int], question: bool) -> torch.Tensor:
        """Prefill and compress (scored first for importance-ranked methods); ``question``: the
        prompt ends with the question (a request), not a document registered for later ones."""
        self.counters["prefills_total"] += 1
        return compress_context(self.model, cache, torch.tensor([ids], device=self.model.device), self.tokenizer,
                                question=question)

    def _register(self, job: Job) -> str:
        cache = self._new_cache(job.method, job.ratio)
        self._prefill(cache, job.ids, question=False)
        if cache.layers[0].keys.is_cuda:  # registered means ready: the reply waits for the GPU
            torch.cuda.synchronize(cache.layers[0].keys.device)
        name = f"doc-{next(self._ids)}"
        self.documents[name] = Document(job.ids, job.method, job.ratio, cache, cache.nbytes())
        while len(self.documents) > 1 and sum(d.nbytes for d in self.documents.values()) > self.reuse_bytes:
            self.documents.popitem(last=False)
        return name

    def _reusable(self, job: Job) -> tuple[str, Document] | None:
        """The named document, or the longest one whose tokens start this prompt (same settings)."""
        if job.document is not None:
            return (job.document, self.documents[job.document]) if job.document in self.documents else None
        best = None
        for name, doc in self.documents.items():
            if (doc.method, doc.ratio) == (job.method, job.ratio) and len(doc.ids) < len(job.ids) \
                    and job.ids[: len(doc.ids)] == doc.ids and (best is None or len(doc.ids) > len(best[1].ids)):
                best = name, doc
        return best

    def _start(self, job: Job) -> None:
        """Prefill and compress ``job``'s prompt, emit its first token, join its batch."""
        cache = self._new_cache(job.method, job.ratio)
        logits = self._prefill(cache, job.ids, question=True)
        self._join((job.method, job.ratio), cache, [job], logits)

    def _start_on_document(self, name: str, jobs: list[Job]) -> None:
        """Requests whose prompts continue document ``name`` by as many tokens: copies of its
        compressed cache read those tokens in one forward pass, then join the batch."""
        doc = self.documents[name]
        self.documents.move_to_end(name)
        self.counters["document_hits_total"] += len(jobs)
        cache = copy.deepcopy(doc.cache)
        if len(jobs) > 1:
            for layer in cache.layers:
                layer.batch_repeat_interleave(len(jobs))
        rest = torch.tensor([job.ids[len(doc.ids):] for job in jobs], device=self.model.device)
        with cache.held():  # the question waits in the window like decoded tokens: clustered on the row's schedule
            logits = self.model(rest, **cache_arg(self.model, cache), use_cache=True, logits_to_keep=1).logits
        self._join((doc.method, doc.ratio), cache, jobs, logits)

    def _join(self, key: tuple[str, float], cache: ClusteredCache, jobs: list[Job], logits: torch.Tensor) -> None:
        """Emit each new row's first token; the rows that go on join the running batch of ``key``."""
        rows = [_Row(job, token, 0, self._entries(job)) for job, token in zip(jobs, logits[:, -1].argmax(-1).tolist())]
        going = [i for i, row in enumerate(rows) if self._emit(row)]
        if not going:
            return
        if len(going) < len(rows):
            cache.keep_rows(going)
        batch = self._batches.setdefault(key, _Batch(self._new_cache(*key)))
        batch.cache.append_rows(cache)
        batch.rows += [rows[i] for i in going]
        self.peak_running = max(self.peak_running, self.running)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.running_kv_bytes())

    def _emit(self, row: _Row) -> bool:
        """Send ``row``'s next token to its client; whether the row goes on."""
        job = row.job
        if job.cancelled.is_set() or (row.token in self._eos and not job.ignore_eos):
            job.tokens.put(None)
            return False
        job.tokens.put(row.token)
        row.produced += 1
        self.counters["generated_tokens_total"] += 1
        if row.produced >= job.max_tokens:
            job.tokens.put(None)
            return False
        return True

    def _step(self, key: tuple[str, float]) -> None:
        """One token for every row of a running batch; rows that are done leave it."""
        batch = self._batches[key]
        live = [i for i, row in enumerate(batch.rows) if not row.job.cancelled.is_set()]
        if len(live) < len(batch.rows):
            for i, row in enumerate(batch.rows):
                if i not in live:
                    row.job.tokens.put(None)
            self._keep(key, live)
            if key not in self._batches:
                return
        device = self.model.device
        tokens = torch.tensor([[row.token] for row in batch.rows], device=device)
        positions = torch.tensor(batch.cache.row_positions(), device=device)[:, None]
        with batch.cache.held():  # every due layer clusters after the step, in one batch
            logits = self.model(tokens, position_ids=positions, **cache_arg(self.model, batch.cache), use_cache=True,
                                logits_to_keep=1).logits
        batch.cache.compress_due()
        self.counters["decode_steps_total"] += 1
        for row, token in zip(batch.rows, logits[:, -1].argmax(-1).tolist()):
            row.token = token
        going = [i for i, row in enumerate(batch.rows) if self._emit(row)]
        if len(going) < len(batch.rows):
            self._keep(key, going)

    def _keep(self, key: tuple[str, float], rows: list[int]) -> None:
        batch = self._batches[key]
        if not rows:
            del self._batches[key]  # and its memory with it
            return
        batch.cache.keep_rows(rows)
        batch.rows = [batch.rows[i] for i in rows]

    def running_kv_bytes(self) -> int:
        """Bytes the running batches' caches hold now (entries, padding included)."""
        return sum(b.cache.nbytes() for b in list(self._batches.values()))

    def metrics(self) -> str:
        """Prometheus text: counters and gauges."""
        lines = []
        values = {**self.counters, "queue_depth": self.jobs.qsize() + (self._waiting is not None),
                  "active_requests": self.running, "running_kv_bytes": self.running_kv_bytes(),
                  "documents": len(self.documents), "document_kv_bytes": sum(d.nbytes for d in self.documents.values())}
        for name, value in values.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE chelsea_{name} {kind}", f"chelsea_{name} {value}"]
        return "\n".join(lines) + "\n"


_STOP = object()  # queued by Engine.close: no request, the worker's signal to finish


def _as_serve_error(err: Exception) -> ServeError:
    if isinstance(err, ServeError):
        return err
    if isinstance(err, ChelseaError):
        return ServeError(400, str(err))
    return ServeError(500, f"generation failed: {err}", kind="server_error")

