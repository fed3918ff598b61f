"""The prefill worker of the engine: admitted requests prefilled, compressed and handed to the decoder.

It takes admitted requests in order (:meth:`chelsea.serving.scheduler.Scheduler.next_start`): it
prefills and compresses a prompt (or copies a registered document's compressed cache and reads
only the rest of the prompt, several questions of one length in one forward), emits the first
token and hands the rows to the decoding worker; it also prefills the documents registered for
reuse. On a GPU it works on its own CUDA stream, synchronised before anything is handed over.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ..cache import ClusteredCache
from ..compat import cache_arg
from ..methods import get_method
from ..scoring import compress_context
from .decoder import Row
from .documents import Document
from .protocol import Job, as_serve_error
from .sampling import RowSampler
from .scheduler import Scheduler


class PrefillWorker:
    """Mixin of :class:`chelsea.serving.Engine`: the loop of the prefill thread and its steps."""

    def _prefill_loop(self) -> None:
        def alike(first: Job, other: Job) -> bool:  # questions on one document, of one length: one forward
            return (not first.register and not other.register and first.document is not None
                    and other.document == first.document and len(other.ids) == len(first.ids))

        while (group := self.scheduler.next_start(alike, self.ADMIT_ROWS - 1)) is not None:
            live = []
            for job in group:
                if job.cancelled.is_set() and not job.register:
                    self.finish(job)
                else:
                    live.append(job)
            if not live:
                continue
            try:
                with torch.inference_mode(), (torch.cuda.stream(self._stream) if self._stream else contextlib.nullcontext()):
                    if live[0].register:
                        live[0].put(self._register(live[0]))
                        continue
                    found = self.documents.reusable(live[0].ids, live[0].method, live[0].ratio, live[0].document)
                    if found is None:
                        for job in live:
                            self._start(job)
                    else:
                        self._start_on_document(found, live)
            except Exception as err:  # noqa: BLE001 - a failed prefill ends its requests, never the worker
                for job in live:
                    if job.register:
                        job.put(as_serve_error(err))
                    else:
                        self.finish(job, err)

    def _new_cache(self, method: str, ratio: float) -> ClusteredCache:
        return ClusteredCache(Scheduler.config(method, ratio), method=get_method("chelsea-paper") if method == "full" else self.configured(method))

    def _prefill(self, cache, ids: list[int], question: bool) -> torch.Tensor:
        """Prefill and compress (scored first for importance-ranked methods); ``question``: the
        prompt ends with the question (a request), not a document registered for later ones."""
        self.count("prefills_total")
        return compress_context(self.model, cache, torch.tensor([ids], device=self.model.device), self.tokenizer,
                                question=question)

    def _register(self, job: Job) -> str:
        cache = self._new_cache(job.method, job.ratio)
        self._prefill(cache, job.ids, question=False)
        self._synchronise()  # registered means ready
        name = f"doc-{next(self.ids)}"
        self.documents.add(name, Document(job.ids, job.method, job.ratio, cache, cache.nbytes()))
        return name

    def _start(self, job: Job) -> None:
        """Prefill and compress ``job``'s prompt, emit its first token, hand it to the decoder."""
        cache = self._new_cache(job.method, job.ratio)
        logits = self._prefill(cache, job.ids, question=True)
        self._hand_over((job.method, job.ratio), cache, [job], logits)

    def _start_on_document(self, name: str, jobs: list[Job]) -> None:
        """Requests whose prompts continue document ``name`` by as many tokens: copies of its
        compressed cache read those tokens in one forward pass, then go to the decoder."""
        doc = self.documents.use(name)
        self.count("document_hits_total", len(jobs))
        cache = copy.deepcopy(doc.cache)
        if len(jobs) > 1:
            for layer in cache.layers:
                layer.batch_repeat_interleave(len(jobs))
        rest = torch.tensor([job.ids[len(doc.ids):] for job in jobs], device=self.model.device)
        with cache.held():  # the question waits in the window like decoded tokens: compressed on the row's schedule
            logits = self.model(rest, **cache_arg(self.model, cache), use_cache=True, logits_to_keep=1).logits
        self._hand_over((doc.method, doc.ratio), cache, jobs, logits)

    def _hand_over(self, key, cache: ClusteredCache, jobs: list[Job], logits: torch.Tensor) -> None:
        """Emit each new row's first token; the rows that go on go to the decoder."""
        rows = [Row(job, 0, RowSampler(job.sampling)) for job in jobs]
        for i, row in enumerate(rows):
            row.token = row.sampler.choose(logits[i, -1])
        going = [i for i, row in enumerate(rows) if self.emit(row)]
        if not going:
            return
        if len(going) < len(rows):
            cache.keep_rows(going)
        self._synchronise()
        self.decoder.hand_over(key, cache, [rows[i] for i in going])

    def _synchronise(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
