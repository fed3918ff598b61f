"""Rows that come and go: a batch prefilled a few rows at a time, a server's running batch.

Every batch row of a layer keeps its own token count, budget, compression schedule and positions,
so rows prefilled or compressed apart can share one batch (:meth:`RowOps.append_rows`,
:meth:`RowOps.take_rows`) and leave it (:meth:`RowOps.keep_rows`) without changing what any row
holds. Rows that saw fewer tokens than the others count the difference as padding tokens (never
stored) and their entries are left-padded with log-count ``-inf`` (:mod:`chelsea.cache.padding`).
"""

from __future__ import annotations

import torch

from ..errors import ChelseaError
from ..host import on_device
from .storage import left_padded, pad_slots


class RowOps:
    """Mixin of :class:`chelsea.cache.ClusteredLayer`: copy rows in, join rows, keep rows."""

    def take_rows(self, part, start: int, batch: int) -> None:
        """Copy the entries of ``part`` (a layer of the same cache kind, prefilled with rows
        ``start:start + rows`` of the same prompts) into those rows of this layer of ``batch`` rows.

        The first call allocates the buffers; a part that stored a different number of entries
        (padded prompts cluster to different lengths) is left-padded, or this layer is, with
        entries of log-count ``-inf``, as a padded batch prefilled at once would be.
        """
        rows = part.keys.shape[0]
        if not self.is_initialized:
            self.dtype, self.device = part.dtype, part.device
            for name in part._buffers:
                buf = getattr(part, name)
                setattr(self, name, buf.new_zeros((batch, *buf.shape[1:])))
            self.seen, self.since_compression, self.new_tokens = part.seen, part.since_compression, part.new_tokens
            self.length = part.length
            self.is_initialized = True
        elif part.seen != self.seen:
            raise ChelseaError(f"rows prefilled apart must see the same number of tokens ({part.seen} vs {self.seen})")
        length = max(self.length, part.length)
        if self.length < length:
            self._left_pad(length - self.length)
        entries = left_padded(part._entries(), part._buffers, length - part.length)
        for name, t in zip(self._buffers, entries):
            getattr(self, name)[start : start + rows, :, :length] = t
        # Padding slots are not tokens (row_padding counts padding tokens seen), but once any
        # exist the rows are treated as padded: attention reads the log-counts, rows cluster apart.
        if part.row_padding is not None or part.length < length or self.row_padding is not None:
            if self.row_padding is None:
                self.row_padding = torch.zeros(batch, dtype=torch.long, device=self.device)
            self.row_padding[start : start + rows] = 0 if part.row_padding is None else part.row_padding
        self.has_merged |= part.has_merged
        self.rescore &= part.rescore
        self.compressions = max(self.compressions, part.compressions)
        self.skipped_compressions = max(self.skipped_compressions, part.skipped_compressions)

    def append_rows(self, part) -> None:
        """Add the rows of ``part`` (same method and settings, any tokens seen, any entries) after
        this layer's rows.

        Rows that have seen fewer tokens than the other side count the difference as padding
        tokens (never stored), so every row keeps its own token count, budget and positions
        (:meth:`tokens_per_row`); the shorter side's entries are left-padded with log-count ``-inf``.
        """
        if part.pinned or self.pinned:
            raise ChelseaError("unpin cache layers before joining their rows")
        if not part.is_initialized:
            raise ChelseaError("rows to join must have been prefilled")
        if not self.is_initialized or self.keys.shape[0] == 0:
            state = {name: getattr(part, name) for name in part._buffers}
            self.__dict__.update({k: v for k, v in part.__dict__.items() if k not in state})
            self._reallocate(part.length + 64, part._entries())
            self.share = part.share if isinstance(part.share, float) else part.share.clone()
            if part.row_padding is not None:
                self.row_padding = part.row_padding.clone()
            rows = part.keys.shape[0]
            self.row_since = list(part.row_since) if part.row_since is not None else [part.since_compression] * rows
            return
        seen = max(self.seen, part.seen)
        length = max(self.length, part.length)
        ours, theirs = self.keys.shape[0], part.keys.shape[0]
        for name in self._buffers:  # one buffer at a time: the old one is freed before the next is made
            mine, other = getattr(self, name)[:, :, : self.length], getattr(part, name)[:, :, : part.length]
            buf = pad_slots(name, mine, length + 64, rows=ours + theirs)
            buf[:ours, :, length - self.length : length] = mine
            buf[ours:, :, length - part.length : length] = other
            del mine
            setattr(self, name, buf)
        padding = [self.row_padding if self.row_padding is not None else torch.zeros(ours, dtype=torch.long, device=self.device),
                   part.row_padding.to(self.device) if part.row_padding is not None else torch.zeros(theirs, dtype=torch.long, device=self.device)]
        self.row_padding = torch.cat([padding[0] + (seen - self.seen), padding[1] + (seen - part.seen)])
        shares = [torch.full((n,), s, dtype=torch.float64) if isinstance(s, float) else s.cpu() for n, s in
                  ((ours, self.share), (theirs, part.share))]
        self.share = torch.cat(shares)
        self.row_since = [since for r, n, s in ((self.row_since, ours, self.since_compression), (part.row_since, theirs, part.since_compression))
                          for since in (r if r is not None else [s] * n)]
        self.seen, self.length = seen, length
        self.has_merged |= part.has_merged
        self.rescore &= part.rescore
        self.compressions = max(self.compressions, part.compressions)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only batch rows ``rows`` (in that order), then drop what no remaining row needs:
        leading entries that are padding in every row, and padding tokens every row counts."""
        index: dict = {}  # one copy of the row numbers per device (not one per buffer)

        def pick(t: torch.Tensor) -> torch.Tensor:
            if t.device not in index:
                index[t.device] = on_device(rows, t.device)
            return t.index_select(0, index[t.device])

        self._map_rows(pick)
        if not rows or self.row_padding is None:
            return
        common = int(self.row_padding.min())
        self.row_padding -= common
        self.seen -= common
        self._drop_leading_padding()

    def _map_extra_rows(self, fn) -> None:
        if self.row_padding is not None:
            self.row_padding = fn(self.row_padding)
        if not isinstance(self.share, float):
            self.share = fn(self.share)
        if self.row_since is not None:
            self.row_since = fn(torch.tensor(self.row_since, dtype=torch.long)).tolist()
