"""What a request is inside the server: its work (:class:`Job`) and how a refusal is said (:class:`ServeError`)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field


class ServeError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers

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
