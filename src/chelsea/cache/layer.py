"""One layer of a :class:`chelsea.cache.ClusteredCache`: keys, values and a log-count per entry.

Life of a layer during ``model.generate``:

1. ``update`` appends the new tokens' keys and values (log-count 0 each) and returns the whole
   stored sequence (:mod:`chelsea.cache.storage`).
2. The ``"chelsea"`` attention function (:mod:`chelsea.attention`) calls :meth:`ClusteredLayer.attend`:
   padding among the new tokens gets log-count ``-inf``, the new tokens attend with the log-count
   bias, the layer's score observer (if its method ranks by scores) sees that attention, and
   the layer compresses if due.
3. It compresses right after a prefill (any forward of more than one token) and, while decoding,
   once ``compress_every`` tokens have arrived since the last compression; the method's
   ``compress`` does the work (:func:`chelsea.cache.compress_together`).

Pinning for CUDA graphs, padded rows and row joins are mixins (:mod:`.pinning`, :mod:`.padding`,
:mod:`.rows`).
"""

from __future__ import annotations

import math

import torch

from ..attention import weighted_attention
from ..kernels import LayerTails
from .compress import compress_together
from .observer import observer_for
from .padding import Padding
from .pinning import Pinning
from .rows import RowOps
from .storage import LayerStorage

SCORE = 1  # where a scored layer keeps each entry's score in its count buffer (its log-count is at 0)


class ClusteredLayer(Pinning, RowOps, Padding, LayerStorage):
    """One layer's keys ``[batch, kv_heads, entries, head_dim]``, values, log-counts (and scores).

    The log-counts are ``_count_buf``; a method that ranks by scores keeps each entry's score beside
    its log-count there (``[..., 2]``), so every layer stores three buffers; :attr:`log_counts` and
    :attr:`scores` are views."""

    _buffers = ("_key_buf", "_value_buf", "_count_buf")

    def __init__(self, config, method):
        super().__init__(config, method)
        self.every = config.compress_every or method.compress_every
        self.since_compression = 0
        self.row_since: list[int] | None = None  # tokens since each row's last compression, once rows were joined (host numbers:
        # a server's step asks every layer whether it is due)
        self.row_padding: torch.Tensor | None = None  # padding tokens seen per row, once any
        self.skipped_compressions = 0
        self.observer = observer_for(method)
        self.scored = method.scores is not None
        # Scores made inside the forward (no compress_context pass) are re-made by every forward of
        # several tokens, so scores from different blocks never compete; off once a pass has scored
        # the whole context (later forwards then only score their own entries).
        self.rescore = True
        self.share = 1.0  # this layer's budget beyond sinks and window, relative to an even split
        # The last queries of the latest forward of several tokens, for a method that fits its merges
        # to them (``method.references``); set by the score observer, used once by the next compression.
        self.references = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._count_buf = torch.zeros(key_states.shape[:2] + (0,) + self._statistics_shape, dtype=torch.float32, device=self.device)

    @property
    def _statistics_shape(self) -> tuple[int, ...]:
        """The count buffer's last dimension: ``(log-count, score)`` per entry for a method that
        ranks by scores, so the scores move with the log-counts (one buffer fewer to copy when
        rows are rewritten); none otherwise."""
        return (2,) if self.scored else ()

    def _split(self, statistics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(log_counts, scores)`` views of a part of the count buffer (scores ``None`` where not kept)."""
        return (statistics[..., 0], statistics[..., SCORE]) if self.scored else (statistics, None)

    def _statistics(self, end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_split` of the first ``end`` slots, ``[batch, kv_heads, end]`` each."""
        return self._split(self._count_buf[:, :, :end])

    @property
    def log_counts(self):
        if not self.is_initialized:
            return None
        return self._count_buf[:, :, : self.length, 0] if self.scored else self._count_buf[:, :, : self.length]

    @property
    def scores(self):
        """Per-entry scores ``[batch, kv_heads, entries]`` (attention received, or importance) for
        the methods that rank by them; ``None`` for the others. A view: writing it writes the cache."""
        return None if not (self.is_initialized and self.scored) else self._count_buf[:, :, : self.length, SCORE]

    def score_new_entries(self, score: torch.Tensor) -> None:
        """Set the scores ``[batch, kv_heads, new]`` of the entries the last forward wrote (at the
        device-side slot when pinned)."""
        if self.pinned:
            self._statistics(self.capacity)[1].index_copy_(2, self.slot, score)
        else:
            self._count_buf[:, :, self.length - self.new_tokens : self.length, SCORE] = score

    @staticmethod
    def newest_entries(layers: list[ClusteredLayer]) -> LayerTails | None:
        """The entries the last forward wrote into each of ``layers``, to read (keys, values) and
        score (:meth:`LayerTails.write` sets their scores) for all layers at once; ``None`` unless
        every layer is scored, unpinned and took the same number of new tokens."""
        n = layers[0].new_tokens if layers else 0
        if not n or any(layer.pinned or not layer.scored or layer.new_tokens != n for layer in layers):
            return None
        return LayerTails([layer._key_buf for layer in layers], [layer._value_buf for layer in layers],
                          [layer._count_buf for layer in layers], [layer.length for layer in layers], n, SCORE)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        zeros = key_states.new_zeros(key_states.shape[:3] + self._statistics_shape, dtype=torch.float32)
        super()._append(key_states, value_states, zeros)
        self.since_compression += key_states.shape[2]
        if self.row_since is not None:
            self.row_since = [since + key_states.shape[2] for since in self.row_since]

    def attend(self, query, key, value, new_valid, scale, module=None):
        """Attention of the new tokens over the stored entries, then compression if it is due."""
        if self.pinned:
            return self._attend_pinned(query, key, value, new_valid, scale, module)
        if new_valid is not None:
            self.mark_padding(new_valid)
        bias = self.attention_log_counts()
        if self.observer is not None:
            out = self.observer.attend(self, query, key, value, bias, scale, module)
            if out is not None:
                self.awaiting_attention = False
                return out
        out = weighted_attention(query, key, value, bias, scale=scale)
        if self.observer is not None and (self.new_tokens > 1 or self.observer.single_tokens):
            self.observer.observe(self, query, key, value, bias, scale, self.scores, module)
        self.after_attention()
        return out

    @property
    def compression_due(self) -> bool:
        if self.hold or self.config.ratio == 0:  # ratio 0 keeps every token: nothing is ever removed
            return False
        if self.new_tokens > 1:
            return True
        if self.row_since is not None:  # joined rows keep their own schedule, as if decoded alone
            return any(since >= self.every for since in self.row_since)
        return self.since_compression >= self.every

    def after_attention(self) -> None:
        self.awaiting_attention = False
        if self.compression_due:
            self.compress()

    def budget(self, tokens: int, row: int = 0) -> int:
        """Entries batch row ``row`` keeps after ``tokens`` tokens: the config's budget, its part
        beyond sinks and window scaled by ``share`` (uneven layer budgets; one share per row once
        rows compressed apart were joined, see :meth:`append_rows`)."""
        return self._budget_for(tokens, self.share if isinstance(self.share, float) else float(self.share[row]))

    def _budget_for(self, tokens: int, share: float) -> int:
        """:meth:`budget` for a row whose share is ``share``."""
        base = self.config.budget(tokens)
        if share == 1.0:
            return base
        protected = self.config.sink_tokens + self.config.window
        return min(tokens, protected + math.ceil(max(0, base - protected) * share))

    def compress(self) -> None:
        """Compress every batch row down to its budget, ``config.budget(tokens seen by the row)``."""
        compress_together([self])

    def _local_start(self, length: int | None = None) -> int:
        """Where a decoding-time compression of ``length`` entries (default: all stored) starts
        (the method's ``decode_span``; 0: the whole cache)."""
        span = self.method.span
        if span is None or self.new_tokens > 1:
            return 0
        start = (self.length if length is None else length) - self.config.window - span
        return start if start > self.config.sink_tokens else 0

    def _run(self, entries: tuple[torch.Tensor, ...], n_remove, sinks: int | None = None, references=None) -> tuple[torch.Tensor, ...]:
        """Apply the method to ``entries`` (one tensor per buffer); returns as many tensors.
        ``references``: the reference queries of a method that fits to them (rows as in ``entries``)."""
        keys, values, statistics = entries
        log_counts, scores = self._split(statistics)
        extra = {"references": references} if self.method.references else {}
        out = self.method.compress(keys, values, log_counts, n_remove, window=self.config.window,
                                   sink_tokens=self.config.sink_tokens if sinks is None else sinks, scores=scores, **extra)
        return (*out[:2], torch.stack(out[2:4], -1)) if self.scored else out[:3]

    def _record(self, removed: int) -> None:
        if removed > 0:
            self.compressions += 1
            self.has_merged = True
        else:
            self.skipped_compressions += 1

    def reset(self) -> None:
        self.__init__(self.config, self.method)

    def stored_entries(self) -> torch.Tensor:
        """Real (non-padding) entries stored per batch row and KV head, ``[batch, kv_heads]``."""
        return (self.log_counts > float("-inf")).sum(-1)

    def nbytes(self) -> int:
        """Bytes of the stored entries: keys, values, log-counts and, for the methods that rank by
        scores, their scores (padding slots included). The buffers' spare room is not counted
        (:meth:`reserved_nbytes`)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self._entries())

    def reserved_nbytes(self) -> int:
        """Bytes allocated for this layer's buffers, spare room included."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._buffers)
