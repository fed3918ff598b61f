"""Admission: which request runs now, which waits, which is refused.

A request that arrives while the running batch has room (``max_batch`` sequences, and its
estimated peak KV memory fits beside the running ones' within ``kv_budget``) is admitted at once:
it holds its place from then until its last token, whether it is still being prefilled or already
decoding. Otherwise it waits, in arrival order, up to ``max_queue`` requests; the oldest is
admitted as soon as a running one ends and it fits. A request beyond that is refused with 429 and a
``Retry-After`` (seconds until a place is likely to free: the recent mean request time). So
``max_batch + max_queue`` requests can be in the server at once without a refusal. Document
registrations take no place in the batch; they queue for the prefill, at most ``max_queue``.

The KV estimate is a request's budget of entries (every layer, every KV head) plus what decoding
adds before its next compression, rows of one batch padded to the longest.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import torch

from ..methods import get_method
from ..settings import CompressionConfig
from .protocol import Job, ServeError


class Scheduler:
    """Admitted, waiting and starting requests, under one lock; the prefill worker takes what starts."""

    def __init__(self, model, *, max_queue: int, max_batch: int, kv_budget: int | None, max_tokens_limit: int):
        self.model = model
        self.max_queue, self.max_batch, self.kv_budget, self.max_tokens_limit = max_queue, max_batch, kv_budget, max_tokens_limit
        self.cond = threading.Condition()
        self.admitted: dict[int, tuple[tuple[str, float], int]] = {}  # id(job) -> (batch key, KV entries)
        self.waiting: deque[Job] = deque()  # arrived, no room yet
        self.starting: deque[Job] = deque()  # admitted (or registrations), for the prefill worker
        self.closing = False
        self._durations: deque[float] = deque(maxlen=32)

    # Limits -----------------------------------------------------------------------------------------

    def check(self, job: Job) -> None:
        """400 if ``job`` can never run here."""
        if job.max_tokens > self.max_tokens_limit:
            raise ServeError(400, f"max_tokens is at most {self.max_tokens_limit}; got {job.max_tokens}", param="max_tokens")
        limit = self.model.config.max_position_embeddings
        if not job.register and len(job.ids) + job.max_tokens > limit:
            raise ServeError(400, f"the prompt has {len(job.ids)} tokens and asks for {job.max_tokens} more; "
                                  f"the model takes {limit} in all: shorten the prompt or max_tokens", param="messages")
        if job.register and len(job.ids) >= limit:
            raise ServeError(400, f"the document has {len(job.ids)} tokens; the model takes {limit} in all, question and "
                                  "answer included: shorten it", param="text")
        if not job.register and self.kv_budget is not None:
            need = self.entries(job) * self.entry_bytes(job.method)
            if need > self.kv_budget:
                raise ServeError(400, f"this request needs about {need / 2**20:.0f} MiB of KV cache, more than the server's "
                                      f"budget of {self.kv_budget / 2**20:.0f} MiB: shorten the prompt or ask for a higher ratio",
                                 param="messages")

    @staticmethod
    def config(method: str, ratio: float) -> CompressionConfig:
        return CompressionConfig(ratio=0.0 if method == "full" else ratio)

    def entries(self, job: Job) -> int:
        """Most KV entries per layer ``job`` will hold: its budget, plus what decoding adds
        before the next compression."""
        cfg = self.config(job.method, job.ratio)
        every = cfg.compress_every or get_method("chelsea-paper" if job.method == "full" else job.method).compress_every
        tokens = len(job.ids) + job.max_tokens
        return min(tokens, cfg.budget(tokens) + every)

    def entry_bytes(self, method: str) -> int:
        """Bytes one KV entry takes over all layers: keys, values, log-count (and score)."""
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        width = torch.finfo(self.model.dtype).bits // 8
        scored = method != "full" and get_method(method).scores is not None
        return cfg.num_hidden_layers * kv_heads * (2 * head_dim * width + 4 * (1 + scored))

    def _fits(self, job: Job) -> bool:
        if not self.admitted:
            return True
        if len(self.admitted) >= self.max_batch:
            return False
        if self.kv_budget is None:
            return True
        rows: dict[tuple[str, float], list[int]] = {}
        for key, entries in [*self.admitted.values(), ((job.method, job.ratio), self.entries(job))]:
            rows.setdefault(key, []).append(entries)
        return sum(len(r) * max(r) * self.entry_bytes(key[0]) for key, r in rows.items()) <= self.kv_budget

    # Arrivals and departures ------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Admit ``job``, let it wait, or refuse it (429 with ``Retry-After``; 503 once closing)."""
        with self.cond:
            if self.closing:
                raise ServeError(503, "the server is shutting down", kind="server_error")
            if job.register:
                if sum(j.register for j in self.starting) >= self.max_queue:
                    raise self._busy()
                self.starting.append(job)
            elif not self.waiting and self._fits(job):
                self._admit(job)
            elif len(self.waiting) < self.max_queue:
                self.waiting.append(job)
            else:
                raise self._busy()
            self.cond.notify_all()

    def _busy(self) -> ServeError:
        wait = math.ceil(sum(self._durations) / len(self._durations)) if self._durations else 1
        return ServeError(429, f"the server is busy: {self.max_batch} requests run and {self.max_queue} wait; retry later",
                          kind="rate_limit_error", headers={"Retry-After": str(max(1, wait))})

    def _admit(self, job: Job) -> None:
        self.admitted[id(job)] = ((job.method, job.ratio), self.entries(job))
        self.starting.append(job)

    def release(self, job: Job, seconds: float | None = None) -> None:
        """``job`` is over (answered, failed or cancelled): its place goes to the oldest waiting ones that fit."""
        with self.cond:
            if self.admitted.pop(id(job), None) is not None and seconds is not None:
                self._durations.append(seconds)
            while self.waiting and self._fits(self.waiting[0]):
                self._admit(self.waiting.popleft())
            self.cond.notify_all()

    def next_start(self, alike=None, limit: int = 0) -> list[Job] | None:
        """The next admitted request to prefill (blocks until there is one), with up to ``limit``
        more for which ``alike(first, other)`` holds, taken out of order; ``None`` once closing and
        nothing is left to start or wait for."""
        with self.cond:
            while not self.starting:
                if self.closing and not self.waiting:
                    return None
                self.cond.wait(0.5)
            first = self.starting.popleft()
            group = [first]
            if alike is not None and limit:
                for other in [j for j in self.starting if alike(first, j)][:limit]:
                    self.starting.remove(other)
                    group.append(other)
            return group

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    @property
    def depth(self) -> int:
        """Requests waiting for a place or for their prefill."""
        with self.cond:
            return len(self.waiting) + len(self.starting)

    @property
    def active(self) -> int:
        """Requests holding a place: being prefilled or decoded."""
        with self.cond:
            return len(self.admitted)
