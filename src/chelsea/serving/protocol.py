"""What a request is inside the server: its work (:class:`Job`), how it samples (:class:`Sampling`)
and how a refusal is said (:class:`ServeError`). No web framework here."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ChelseaError


class ServeError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body; ``headers``
    go with the reply (``Retry-After`` on a 429)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are chosen. ``temperature`` 0 is greedy (the argmax);
    ``top_p`` keeps the smallest set of tokens whose probabilities reach it; a ``seed`` makes the
    draws repeat; the penalties lower the logits of tokens already generated (OpenAI's presence
    and frequency penalties)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.argmax and not self.presence_penalty and not self.frequency_penalty

    @property
    def argmax(self) -> bool:
        """Whether the token is the most likely one (a temperature too small to divide by counts as 0)."""
        return self.temperature < 1e-5 or self.top_p == 0


@dataclass
class Job:
    """One request's work: prompt ids, settings, where its tokens go.

    The engine :meth:`put`\\ s the generated token ids one by one, then ``None`` (or a
    :class:`ServeError`); they land in ``tokens`` and, when set, ``listener`` is called with each
    (the HTTP layer hands them to its event loop this way, without a thread per stream).
    ``ignore_eos`` generates ``max_tokens`` whatever comes (benchmarks).
    """

    ids: list[int]
    method: str
    ratio: float
    max_tokens: int
    document: str | None = None
    register: bool = False  # prefill and keep as a document instead of answering
    ignore_eos: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    tokens: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    listener: Callable | None = None

    def put(self, item) -> None:
        self.tokens.put(item)
        if self.listener is not None:
            self.listener(item)


def as_serve_error(err: Exception) -> ServeError:
    """What a failure looks like to the client: bad input (400) or the server's own failure (500)."""
    if isinstance(err, ServeError):
        return err
    if isinstance(err, ChelseaError):
        return ServeError(400, str(err))
    return ServeError(500, f"generation failed: {err}", kind="server_error")
