"""Admission: which waiting request may start, within the batch and KV-memory limits.

Requests wait in arrival order, up to ``max_queue``; the oldest starts once the running batch has
room for one more sequence (``max_batch``) and its estimated peak KV memory fits beside the
running ones' (``kv_budget``). The estimate is a request's budget of entries (every layer, every
KV head) plus what decoding adds before its next compression, rows padded to the longest.
"""

from __future__ import annotations

import queue

import torch

from ..methods import get_method
from ..settings import CompressionConfig
from .protocol import Job, ServeError

STOP = object()  # queued by Engine.close: no request, the worker's signal to finish


class Scheduler:
    """The queue of waiting requests and the admission rule."""

    def __init__(self, model, *, max_queue: int, max_batch: int, kv_budget: int | None, max_tokens_limit: int):
        self.model = model
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.max_batch, self.kv_budget, self.max_tokens_limit = max_batch, kv_budget, max_tokens_limit
        self.waiting: Job | None = None  # the oldest request, taken from the queue, waiting for room

    def check(self, job: Job) -> None:
        """400 if ``job`` can never run here."""
        if job.max_tokens > self.max_tokens_limit:
            raise ServeError(400, f"max_tokens is at most {self.max_tokens_limit}; got {job.max_tokens}", param="max_tokens")
        limit = self.model.config.max_position_embeddings
        if not job.register and len(job.ids) + job.max_tokens > limit:
            raise ServeError(400, f"the prompt has {len(job.ids)} tokens and asks for {job.max_tokens} more; "
                                  f"the model takes {limit} in all: shorten the prompt or max_tokens", param="messages")
        if not job.register and self.kv_budget is not None:
            need = self.entries(job) * self.entry_bytes(job.method)
            if need > self.kv_budget:
                raise ServeError(400, f"this request needs about {need / 2**20:.0f} MiB of KV cache, more than the server's "
                                      f"budget of {self.kv_budget / 2**20:.0f} MiB: shorten the prompt or ask for a higher ratio",
                                 param="messages")

    def put(self, job) -> None:
        """Queue ``job``; 429 when the queue is full."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ServeError(429, "the server is busy: too many requests are waiting; retry later", kind="rate_limit_error") from None

    def next_job(self, block: bool) -> Job | None:
        """The oldest waiting request (``None`` when there is none, or on the stop signal)."""
        if self.waiting is not None:
            job, self.waiting = self.waiting, None
            return job
        try:
            job = self.jobs.get(block=block)
        except queue.Empty:
            return None
        return None if job is STOP else job

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + (self.waiting is not None)

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

    def projected_bytes(self, running: dict[tuple[str, float], list[int]], extra: list[Job]) -> int:
        """KV bytes of the running batches at their peak (rows padded to the longest; ``running``
        maps each batch's (method, ratio) to its rows' entries), with the rows of ``extra`` added."""
        rows = {key: list(entries) for key, entries in running.items()}
        for job in extra:
            rows.setdefault((job.method, job.ratio), []).append(self.entries(job))
        return sum(len(r) * max(r) * self.entry_bytes(key[0]) for key, r in rows.items() if r)

    def fits(self, job: Job, admitted: list[Job], running: dict[tuple[str, float], list[int]]) -> bool:
        """Whether ``job`` fits beside the running requests and those ``admitted`` this round."""
        count = sum(len(r) for r in running.values()) + len(admitted)
        if count == 0:
            return True
        if count >= self.max_batch:
            return False
        return self.kv_budget is None or self.projected_bytes(running, [*admitted, job]) <= self.kv_budget
