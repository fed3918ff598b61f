"""The decoding worker: the running batches, one token per row per step, rows joining and leaving.

Rows come prefilled (their caches compressed, their first token emitted) from the prefill worker
through :meth:`Decoder.hand_over`; between two steps they join the running batch of their method
and ratio (:meth:`chelsea.cache.ClusteredCache.append_rows`). A step is one forward pass for all
rows of a batch, each at its own position; every due layer compresses after it, every row on its
own schedule, so a row's answer does not depend on what runs beside it. Rows that are done (length,
end of sequence, stop, client gone) leave and their memory is freed
(:meth:`~chelsea.cache.ClusteredCache.keep_rows`).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..cache import ClusteredCache
from ..compat import cache_arg
from ..host import on_device
from ..runtime.decoding import RowStep
from .protocol import Job
from .sampling import RowSampler, choose_tokens

log = logging.getLogger(__name__)


@dataclass
class Row:
    """A running request: the token to emit and feed next, how many it produced, how it samples."""

    job: Job
    token: int
    sampler: RowSampler
    produced: int = 0


@dataclass
class _Batch:
    """The running rows of one (method, ratio); row ``i`` of ``cache`` belongs to ``rows[i]``.
    ``graph``: its pinned step, replayed from a CUDA graph (the engine's ``cuda_graph``), from
    its first step until rows join or leave."""

    cache: ClusteredCache
    rows: list[Row] = field(default_factory=list)
    graph: RowStep | None = None

    def unpin(self) -> None:
        """Let rows join or leave: the pinned step's buffers may move now."""
        if self.graph is not None:
            self.graph.close()
            self.graph = None


class Decoder:
    """Owns the running batches; runs in its own thread (:meth:`run`)."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.model
        self.incoming: queue.Queue = queue.Queue()  # (key, cache, rows) handed over by the prefill worker
        self.batches: dict[tuple[str, float], _Batch] = {}
        self.stopped = threading.Event()  # set by the engine once no more rows can come
        self.peak_running = 0
        self.peak_kv_bytes = 0

    def hand_over(self, key: tuple[str, float], cache: ClusteredCache, rows: list[Row]) -> None:
        """Rows prefilled on another thread (and CUDA stream, already synchronised) join at the next step."""
        self.incoming.put((key, cache, rows))

    @property
    def running(self) -> int:
        return sum(len(b.rows) for b in list(self.batches.values()))

    def running_kv_bytes(self) -> int:
        return sum(b.cache.nbytes() for b in list(self.batches.values()))

    def run(self) -> None:
        while not (self.stopped.is_set() and not self.batches and self.incoming.empty()):
            try:
                with torch.inference_mode():
                    self._join_incoming(block=not self.batches)
                    for key in list(self.batches):
                        self._step(key)
            except Exception as err:  # noqa: BLE001 - a failed step ends its requests, never the worker
                for batch in self.batches.values():
                    for row in batch.rows:
                        self.engine.finish(row.job, err)
                self.batches.clear()

    def _join_incoming(self, block: bool) -> None:
        while True:
            try:
                key, cache, rows = self.incoming.get(timeout=0.05) if block else self.incoming.get_nowait()
            except queue.Empty:
                return
            block = False
            _claim(cache)
            batch = self.batches.setdefault(key, _Batch(cache.empty_like()))
            batch.unpin()
            batch.cache.append_rows(cache)
            batch.rows += rows
            self.peak_running = max(self.peak_running, self.running)
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.running_kv_bytes())

    def _step(self, key: tuple[str, float]) -> None:
        """One token for every row of a running batch; rows that are done leave it."""
        batch = self.batches[key]
        live = [i for i, row in enumerate(batch.rows) if not row.job.cancelled.is_set()]
        if len(live) < len(batch.rows):
            for i, row in enumerate(batch.rows):
                if i not in live:
                    self.engine.finish(row.job)
            self._keep(key, live)
            if key not in self.batches:
                return
        device = self.model.device
        tokens = on_device([[row.token] for row in batch.rows], device)
        logits = self._replayed(batch, tokens) if self.engine.cuda_graph else None
        if logits is None:
            positions = on_device(batch.cache.row_positions(), device)[:, None]
            with batch.cache.held():  # every due layer compresses after the step, in one batch
                logits = self.model(tokens, position_ids=positions, **cache_arg(self.model, batch.cache), use_cache=True,
                                    logits_to_keep=1).logits
        # The tokens first: choosing them waits for the forward, and the compressions queued after
        # that run on the GPU while the host goes on to the next step.
        for row, token in zip(batch.rows, choose_tokens(logits[:, -1], [row.sampler for row in batch.rows])):
            row.token = token
        batch.cache.compress_due()
        self.engine.count("decode_steps_total")
        going = [i for i, row in enumerate(batch.rows) if self.engine.emit(row)]
        if len(going) < len(batch.rows):
            self._keep(key, going)

    def _replayed(self, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor | None:
        """The step's logits from the batch's CUDA graph; ``None`` (and eager steps from then on,
        with a warning) if it cannot be pinned, recorded or replayed on this machine."""
        try:
            if batch.graph is None:
                batch.graph = RowStep(self.model, batch.cache, cuda_graph=True)
            return batch.graph.forward(tokens)
        except Exception as err:  # noqa: BLE001 - a model or build whose step cannot be recorded
            log.warning("decoding steps cannot be replayed from a CUDA graph here (%s); running them eagerly from now on", err)
            self.engine.cuda_graph = False
            batch.graph = None
            for layer in batch.cache.layers:  # pinned or not, and not waiting for a forward that stopped inside
                layer.unpin()
                layer.awaiting_attention = False
            return None

    def _keep(self, key: tuple[str, float], rows: list[int]) -> None:
        batch = self.batches[key]
        batch.unpin()
        if not rows:
            del self.batches[key]  # and its memory with it
            return
        batch.cache.keep_rows(rows)
        batch.rows = [batch.rows[i] for i in rows]


def _claim(cache: ClusteredCache) -> None:
    """Mark the buffers a prefill made on another CUDA stream as used on this one, so their memory
    is not handed back to that stream while this one's kernels may still read them."""
    if not torch.cuda.is_available():
        return
    stream = None
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.is_cuda:
            stream = stream or torch.cuda.current_stream(layer.keys.device)
            for name in layer._buffers:
                getattr(layer, name).record_stream(stream)

