"""The serving engine: requests admitted within limits, prefilled on one thread, decoded together on another.

- :mod:`.scheduler` admits a request at once while the running batch has room, else lets it
  wait (429 beyond the queue);
- the **prefill worker** (this module) takes admitted requests in order: it prefills and
  compresses a prompt (or copies a registered document's compressed cache and reads only the
  rest of the prompt, several questions of one length in one forward), emits the first token and
  hands the rows to the decoder; it also prefills documents registered for reuse
  (:mod:`.documents`). On a GPU it works on its own CUDA stream;
- the **decoding worker** (:mod:`.decoder`) steps the running batches.

So a long prefill does not stop the tokens of running requests. The full cache is a
:class:`~chelsea.ClusteredCache` with ratio 0 (same buffers and attention), so it batches the same
way. This module needs no web framework: :mod:`.app` puts HTTP in front of it and
``benchmarks/serve_load.py`` drives it directly.
"""

from __future__ import annotations

import itertools
import threading
import time

import torch

from ..errors import ChelseaError
from ..methods import check_settings_known, configure, method_names
from ..runtime import use_method
from ..scoring import find_fact_heads, find_learned
from ..settings import CompressionConfig
from .decoder import Decoder, Row
from .documents import DocumentStore
from .prompts import PromptBuilder
from .protocol import Job, ServeError, as_serve_error
from .prefill import PrefillWorker
from .scheduler import Scheduler

COUNTERS = ("requests_total", "prefills_total", "document_hits_total", "generated_tokens_total", "rejected_total",
            "decode_steps_total")


def servable_methods() -> tuple[str, ...]:
    """What a request may ask for: ``full`` and every registered method that takes the ratio."""
    return ("full", *method_names(takes_ratio=True))


class Engine(PrefillWorker):
    """The model, its compressed documents and the two workers that serve every request.

    Args:
        method, ratio: compression of requests that do not ask for another.
        max_queue: requests that may wait for a place in the batch; more are refused (429).
        reuse_bytes: KV memory for registered documents (least recently used dropped first).
        max_tokens_limit: largest ``max_tokens`` a request may ask for.
        max_batch: sequences decoded together at most.
        kv_budget: KV bytes the running sequences may hold together (``None``: no limit).
    """

    ADMIT_ROWS = 8  # questions on one document started in one forward at most

    def __init__(self, model, tokenizer, *, method: str = "chelsea", ratio: float = 0.8, max_queue: int = 16,
                 reuse_bytes: int = 8 << 30, max_tokens_limit: int = 1024, max_batch: int = 16, kv_budget: int | None = None,
                 settings: dict | None = None, cuda_graph: bool = False):
        if max_batch < 1:
            raise ChelseaError(f"max_batch must be at least 1; got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.method, self.ratio = method, ratio
        self.method_settings = dict(settings or {})
        if cuda_graph and model.device.type != "cuda":
            raise ChelseaError("cuda_graph needs the model on a CUDA device")
        self.cuda_graph = cuda_graph  # decoding steps replayed from CUDA graphs (chelsea.runtime.RowStep)
        check_settings_known(servable_methods(), self.method_settings)
        self.prompts = PromptBuilder(tokenizer)
        self.scheduler = Scheduler(model, max_queue=max_queue, max_batch=max_batch, kv_budget=kv_budget,
                                   max_tokens_limit=max_tokens_limit)
        self.documents = DocumentStore(reuse_bytes)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()
        self.ids = itertools.count(1)
        use_method(model, "chelsea")  # every cache here is a ClusteredCache (full: ratio 0)
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        self.decoder = Decoder(self)
        self._threads = [threading.Thread(target=self._prefill_loop, daemon=True, name="chelsea-prefill"),
                         threading.Thread(target=self.decoder.run, daemon=True, name="chelsea-decode")]
        for thread in self._threads:
            thread.start()

    # Requests -----------------------------------------------------------------------------------

    def settings(self, extra: dict | None) -> tuple[str, float, str | None]:
        """The method, ratio and document a request's ``chelsea`` options ask for (checked)."""
        extra = {k: v for k, v in (extra or {}).items() if v is not None}
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
        """Admit or queue ``job``; 400 if it can never run, 429 when every place is taken, 503 once closing."""
        self.scheduler.check(job)
        try:
            self.scheduler.submit(job)
        except ServeError as err:
            if err.status == 429:
                self.count("rejected_total")
            raise
        self.count("requests_total")
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

    def prepare(self, method: str | None = None) -> bool:
        """Do the once-per-model work of ``method`` (default: the server's) now: the learned
        scorer of ``chelsea`` (or its fact heads with reconstruction scoring), stored for later
        runs. Returns whether there was any."""
        name = method or self.method
        chosen = self.configured(name) if name != "full" else None
        if chosen is None or chosen.scores != "importance":
            return False
        cache = self._new_cache(name, self.ratio)
        with torch.inference_mode():
            if chosen.scoring.importance == "learned":
                find_learned(self.model, self.tokenizer, cache)
            elif chosen.scoring.fact_weight:
                find_fact_heads(self.model, self.tokenizer, cache)
            else:
                return False
        return True

    def configured(self, method: str):
        """The registered method ``method`` with the server's settings (``--set``) applied."""
        return configure(method, self.method_settings)

    @property
    def running(self) -> int:
        """Requests being decoded now."""
        return self.decoder.running

    @property
    def peak_running(self) -> int:
        return self.decoder.peak_running

    @property
    def peak_kv_bytes(self) -> int:
        return self.decoder.peak_kv_bytes

    def running_kv_bytes(self) -> int:
        """Bytes the running batches' caches hold now (entries, padding included)."""
        return self.decoder.running_kv_bytes()

    def close(self) -> None:
        """Finish what runs and waits now, refuse new requests meanwhile (503), stop the workers."""
        self.scheduler.close()
        self._threads[0].join()
        self.decoder.stopped.set()
        self._threads[1].join()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def metrics(self) -> str:
        """Prometheus text: counters and gauges."""
        values = {**self.counters, "queue_depth": self.scheduler.depth, "active_requests": self.scheduler.active,
                  "running_kv_bytes": self.running_kv_bytes(), "documents": len(self.documents),
                  "document_kv_bytes": self.documents.nbytes}
        lines = []
        for name, value in values.items():
            lines += [f"# TYPE chelsea_{name} {'counter' if name.endswith('_total') else 'gauge'}", f"chelsea_{name} {value}"]
        return "\n".join(lines) + "\n"

    # Tokens out -----------------------------------------------------------------------------------

    def emit(self, row: Row) -> bool:
        """Send ``row``'s next token to its client; whether the row goes on."""
        job = row.job
        if job.cancelled.is_set() or (row.token in self._eos and not job.ignore_eos):
            self.finish(job)
            return False
        job.put(row.token)
        row.produced += 1
        self.count("generated_tokens_total")
        if row.produced >= job.max_tokens:
            self.finish(job)
            return False
        return True

    def finish(self, job: Job, error: Exception | None = None) -> None:
        """End ``job``'s answer (with ``error`` if it failed) and give its place to the next request."""
        job.put(None if error is None else as_serve_error(error))
        self.scheduler.release(job, time.perf_counter() - job.submitted)
