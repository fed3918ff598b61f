"""The serving engine: requests decoded together in one running batch, documents compressed once.

One worker thread owns the model. It loops:

1. **admit** waiting requests, oldest first, while they fit (:mod:`.scheduler`). A new request
   is prefilled and compressed on its own (or starts from a copy of a registered document's
   compressed cache and reads only its remaining tokens, :mod:`.documents`), gets its first
   token, and its cache rows join the running batch of its method and ratio
   (:meth:`chelsea.cache.ClusteredCache.append_rows`);
2. **step** every running batch by one token: one forward pass for all its rows, each row at its
   own position; rows that are done (length, end of sequence, client gone) leave the batch and
   their memory is freed (:meth:`~chelsea.cache.ClusteredCache.keep_rows`).

Every row is compressed on its own schedule, exactly as it would be alone, so a request's answer
does not depend on what else runs beside it. The full cache is a :class:`ClusteredCache` with
ratio 0 (same buffers and attention), so it batches the same way. This module needs no web
framework: :mod:`chelsea.serving.app` puts HTTP in front of it and ``benchmarks/serve_load.py``
drives it directly.
"""

from __future__ import annotations

import copy
import itertools
import threading
from dataclasses import dataclass, field

import torch

from ..cache import ClusteredCache
from ..compat import cache_arg
from ..errors import ChelseaError
from ..methods import get_method, method_names
from ..runtime import use_method
from ..scoring import compress_context
from ..settings import CompressionConfig
from .documents import Document, DocumentStore
from .prompts import PromptBuilder
from .protocol import Job, ServeError
from .scheduler import STOP, Scheduler


def servable_methods() -> tuple[str, ...]:
    """What a request may ask for: ``full`` and every registered method that takes the ratio."""
    return ("full", *method_names(takes_ratio=True))


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
        self.prompts = PromptBuilder(tokenizer)
        self.scheduler = Scheduler(model, max_queue=max_queue, max_batch=max_batch, kv_budget=kv_budget,
                                   max_tokens_limit=max_tokens_limit)
        self.documents = DocumentStore(reuse_bytes)
        self.counters = {"requests_total": 0, "prefills_total": 0, "document_hits_total": 0, "generated_tokens_total": 0,
                         "rejected_total": 0, "decode_steps_total": 0}
        self.ids = itertools.count(1)
        self._batches: dict[tuple[str, float], _Batch] = {}
        self._closing = False
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
        if method not in servable_methods():
            raise ServeError(400, f"method must be one of {', '.join(servable_methods())}; got {method!r}", param="chelsea.method")
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
        self.scheduler.check(job)
        try:
            self.scheduler.put(job)
        except ServeError:
            self.counters["rejected_total"] += 1
            raise
        self.counters["requests_total"] += 1
        return job

    def register(self, text: str, method: str, ratio: float) -> tuple[str, int]:
        """Prefill and compress a document once; returns its id and token count."""
        ids = self.prompts.document_ids(text)
        return self.register_ids(ids, method, ratio), len(ids)

    def register_ids(self, ids: list[int], method: str, ratio: float) -> str:
        """:meth:`register` for a document already tokenized; returns its id."""
        job = self.submit(Job(ids, method, ratio, 0, register=True))
        result = job.tokens.get()
        if isinstance(result, Exception):
            raise result
        return result

    def document_ids(self, text: str) -> list[int]:
        return self.prompts.document_ids(text)

    def question_ids(self, question: str) -> list[int]:
        return self.prompts.question_ids(question)

    def chat_ids(self, messages: list[dict], document: str | None) -> list[int]:
        return self.prompts.chat_ids(messages, self.documents[document].ids if document is not None else None)

    def completion_ids(self, prompt: str, document: str | None) -> list[int]:
        return self.prompts.completion_ids(prompt, self.documents[document].ids if document is not None else None)

    @property
    def running(self) -> int:
        """Requests being generated now."""
        return sum(len(b.rows) for b in self._batches.values())

    def close(self) -> None:
        """Stop the worker after what runs and waits now (new requests are refused meanwhile)."""
        self._closing = True
        self.scheduler.jobs.put(STOP)  # wakes a worker that waits for requests; comes after every queued one
        self._worker.join()

    # The worker ---------------------------------------------------------------------------------

    def _run(self) -> None:
        sched = self.scheduler
        while not (self._closing and self.running == 0 and sched.waiting is None and sched.jobs.empty()):
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

    def _running_entries(self) -> dict[tuple[str, float], list[int]]:
        return {key: [r.entries for r in b.rows] for key, b in self._batches.items()}

    def _admit(self) -> None:
        """Start waiting requests, oldest first, while they fit; block while nothing runs."""
        admitted: list[Job] = []
        sched = self.scheduler
        while (job := sched.next_job(block=self.running == 0 and not admitted)) is not None:
            if job.cancelled.is_set():
                job.tokens.put(None)
                continue
            if job.register:  # in arrival order: what came before starts first
                self._start_all(admitted)
                admitted = []
                self._guarded([job], lambda: job.tokens.put(self._register(job)))
                continue
            if not sched.fits(job, admitted, self._running_entries()):
                sched.waiting = job
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
            found = self.documents.reusable(job.ids, job.method, job.ratio, job.document)
            if found is None:
                self._guarded([job], lambda job=job: self._start(job))
            else:
                together.setdefault((found, len(job.ids)), []).append(job)
        for (name, _), group in together.items():
            for i in range(0, len(group), self.ADMIT_ROWS):
                part = group[i : i + self.ADMIT_ROWS]
                self._guarded(part, lambda name=name, part=part: self._start_on_document(name, part))

    def _new_cache(self, method: str, ratio: float) -> ClusteredCache:
        return ClusteredCache(Scheduler.config(method, ratio), method=get_method("chelsea-paper" if method == "full" else method))

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
        name = f"doc-{next(self.ids)}"
        self.documents.add(name, Document(job.ids, job.method, job.ratio, cache, cache.nbytes()))
        return name

    def _start(self, job: Job) -> None:
        """Prefill and compress ``job``'s prompt, emit its first token, join its batch."""
        cache = self._new_cache(job.method, job.ratio)
        logits = self._prefill(cache, job.ids, question=True)
        self._join((job.method, job.ratio), cache, [job], logits)

    def _start_on_document(self, name: str, jobs: list[Job]) -> None:
        """Requests whose prompts continue document ``name`` by as many tokens: copies of its
        compressed cache read those tokens in one forward pass, then join the batch."""
        doc = self.documents.use(name)
        self.counters["document_hits_total"] += len(jobs)
        cache = copy.deepcopy(doc.cache)
        if len(jobs) > 1:
            for layer in cache.layers:
                layer.batch_repeat_interleave(len(jobs))
        rest = torch.tensor([job.ids[len(doc.ids):] for job in jobs], device=self.model.device)
        with cache.held():  # the question waits in the window like decoded tokens: compressed on the row's schedule
            logits = self.model(rest, **cache_arg(self.model, cache), use_cache=True, logits_to_keep=1).logits
        self._join((doc.method, doc.ratio), cache, jobs, logits)

    def _join(self, key: tuple[str, float], cache: ClusteredCache, jobs: list[Job], logits: torch.Tensor) -> None:
        """Emit each new row's first token; the rows that go on join the running batch of ``key``."""
        rows = [_Row(job, token, 0, self.scheduler.entries(job)) for job, token in zip(jobs, logits[:, -1].argmax(-1).tolist())]
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
        with batch.cache.held():  # every due layer compresses after the step, in one batch
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
        values = {**self.counters, "queue_depth": self.scheduler.depth, "active_requests": self.running,
                  "running_kv_bytes": self.running_kv_bytes(), "documents": len(self.documents),
                  "document_kv_bytes": self.documents.nbytes}
        for name, value in values.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE chelsea_{name} {kind}", f"chelsea_{name} {value}"]
        return "\n".join(lines) + "\n"


def _as_serve_error(err: Exception) -> ServeError:
    if isinstance(err, ServeError):
        return err
    if isinstance(err, ChelseaError):
        return ServeError(400, str(err))
    return ServeError(500, f"generation failed: {err}", kind="server_error")
