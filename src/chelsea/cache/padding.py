"""Padded rows: prompts of different lengths in one batch, rows joined from different caches.

Padding is stored as entries of log-count ``-inf`` (never attended, never merged) and counted per
row in ``row_padding`` (padding tokens seen). Padded rows are compressed row by row, each over its
own real entries, so a row's result equals what it would get alone; the rows are then written
back right-aligned (left padding), and padding that every row shares is freed.
"""

from __future__ import annotations

import torch

from ..host import on_device
from .storage import left_padded, pad_view


def row_stats(layers: list) -> list[list[list[int]]]:
    """Per layer, per batch row (all layers have the same rows): ``[real entries stored, whether
    they are contiguous (padding only before them, as joins and clusterings leave rows), padding
    tokens seen]``, read to the host.

    The layers' validity masks are joined along the entries and summed per layer with prefix
    sums: a few kernels and one read per device for all layers, not a few kernels and a read per
    layer (a decoding step of a server compresses some row of every layer nearly every step)."""
    stats: list = [None] * len(layers)
    by_device: dict = {}
    for i, layer in enumerate(layers):
        by_device.setdefault(layer.device, []).append(i)
    for device, members in by_device.items():
        group = [layers[i] for i in members]
        valid = torch.cat([layer.log_counts[:, 0] for layer in group], dim=1) > float("-inf")  # padding is marked on every head alike
        zero = valid.new_zeros(valid.shape[0], 1, dtype=torch.long)
        bounds = on_device([0, *(layer.length for layer in group)], device).cumsum(0)  # where each layer starts and ends
        stored = torch.cat([zero, valid.long().cumsum(1)], 1).index_select(1, bounds).diff(dim=1)
        # a row is contiguous unless a real entry is followed by padding within its layer
        after = torch.cat([valid[:, 1:], valid.new_ones(valid.shape[0], 1)], 1)
        drops = torch.cat([zero, (valid & ~after).long().cumsum(1)], 1)
        first, last = bounds[:-1], (bounds[1:] - 1).clamp_min(bounds[:-1])
        contiguous = (drops.index_select(1, last) == drops.index_select(1, first)).long()
        padding = torch.stack([layer.row_padding.to(device) if layer.row_padding is not None else zero[:, 0] for layer in group], 1)
        table = torch.stack([stored, contiguous, padding]).cpu().tolist()  # [3][rows][layers]
        for j, i in enumerate(members):
            stats[i] = [[row[j] for row in part] for part in table]
    return stats


class Padding:
    """Mixin of :class:`chelsea.cache.ClusteredLayer`: mark, count and compress around padding."""

    def _left_pad(self, pad: int) -> None:
        """Put ``pad`` padding entries (log-count ``-inf``) before every row's stored entries."""
        self._reallocate(max(self.capacity, self.length + pad), left_padded(self._entries(), self._buffers, pad))
        self.length += pad
        if self.row_padding is None:
            self.row_padding = torch.zeros(self._key_buf.shape[0], dtype=torch.long, device=self.device)

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """Give padding among the newest tokens log-count ``-inf``: never attended, never merged."""
        if bool(new_valid.all()):
            return
        tail = self.log_counts[:, :, -new_valid.shape[1] :]
        pad = ~new_valid.to(tail.device)
        tail.masked_fill_(pad[:, None, :], float("-inf"))
        padding = pad.sum(-1)
        self.row_padding = padding if self.row_padding is None else self.row_padding + padding

    @property
    def has_padding(self) -> bool:
        return self.row_padding is not None

    def attention_log_counts(self) -> torch.Tensor | None:
        """The bias for attention, or ``None`` while every stored entry is one real token."""
        return self.log_counts if (self.has_padding or self.has_merged) else None

    def tokens_per_row(self) -> list[int]:
        """Real tokens seen by each batch row: tokens seen minus the row's padding.

        Not the sum of counts: eviction methods drop entries together with their counts.
        """
        if self.row_padding is None:
            return [self.seen] * self.keys.shape[0]
        return [self.seen - int(p) for p in self.row_padding.tolist()]

    def _due_rows(self, stats: list[list[int]] | None = None) -> list[tuple[int, int, int, int, bool]]:
        """Padded rows to cluster now, each as (row, real entries stored, entries to remove, local
        start as :meth:`_local_start` gives it for the row's real entries, whether the real entries
        are the row's last slots: :meth:`_real_entries` finds them otherwise).

        ``stats`` is this layer's part of :func:`row_stats` (read for many layers at once); joined
        rows (:meth:`append_rows`) are due only when their own schedule says so."""
        stored, contiguous, padding = stats if stats is not None else row_stats([self])[0]
        due = [True] * len(stored)
        if self.row_since is not None:
            due = [since >= self.every or self.new_tokens > 1 for since in self.row_since]
            self.row_since = [0 if d else since for since, d in zip(self.row_since, due)]
        shares = [self.share] * len(stored) if isinstance(self.share, float) else self.share.tolist()
        to_remove = [n - self._budget_for(self.seen - p, s) if d else 0 for n, p, s, d in zip(stored, padding, shares, due)]
        return [(b, stored[b], n_remove, self._local_start(stored[b]), bool(contiguous[b]))
                for b, n_remove in enumerate(to_remove) if n_remove > 0]

    def _real_entries(self, b: int, stored: int, contiguous: bool) -> torch.Tensor:
        """Indices of row ``b``'s real entries (``stored`` of them)."""
        if contiguous:  # the row's real entries are its last ``stored`` slots: no search
            return torch.arange(self.length - stored, self.length, device=self.device)
        return (self.log_counts[b, 0] > float("-inf")).nonzero().squeeze(-1)

    def _row(self, b: int, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[b : b + 1].index_select(2, idx) for t in self._entries())

    def _rewrite_tails(self, rows: list[int], stored: list[int], span: int, kept: list[int],
                       tails: tuple[torch.Tensor, ...]) -> None:
        """Rows ``rows``, whose ``stored`` real entries are their last slots, had their last
        ``span`` entries compressed to the first ``kept`` entries of ``tails`` (one tensor per
        buffer, ``[rows, heads, >= max(kept), ...]``): rewrite them right-aligned in one gather
        per buffer (not one copy per row), the entries before the span shifted up by what was
        removed and padding in front."""
        length, device = self.length, self.device
        index = on_device([rows, stored, kept], device)
        b, stored_t, kept_t = index[0], index[1, :, None], index[2, :, None]
        removed = span - kept_t
        slot = torch.arange(length, device=device)[None]
        # sources: [one padding slot | the rows' stored slots | the compressed tails]
        source = torch.where(slot >= length - kept_t, 1 + length + slot - (length - kept_t), 1 + slot - removed)
        source = torch.where(slot < length - stored_t + removed, 0, source)
        for name, tail in zip(self._buffers, tails):
            buf = getattr(self, name)
            old = buf[:, :, :length].index_select(0, b)
            fill = pad_view(name, old, 1)
            joined = torch.cat([fill, old, tail], dim=2)
            take = source.view(len(rows), 1, length, *([1] * (old.dim() - 3))).expand(*old.shape)
            buf[:, :, :length].index_copy_(0, b, torch.gather(joined, 2, take))

    def _write_row(self, b: int, row: tuple[torch.Tensor, ...]) -> None:
        """Rewrite row ``b`` with ``row`` (no longer than the stored length), right-aligned."""
        for name, t in zip(self._buffers, left_padded(row, self._buffers, self.length - row[0].shape[2])):
            getattr(self, name)[b : b + 1, :, : self.length] = t

    def _drop_leading_padding(self, at_most: int | None = None) -> None:
        """Free the leading entries that are padding in every row (the buffers shrink to fit).

        ``at_most`` bounds how many there can be (the caller knows each row's length); below 64
        nothing is looked at: a few shared padding slots are cheaper to keep than a read back
        from the device and a copy of the whole layer after every clustering."""
        if self.length == 0 or self.keys.shape[0] == 0:
            return
        if at_most is not None and at_most < 64:
            return
        real = (self.log_counts > float("-inf")).any(1).any(0)  # [entries]: some row stores a real entry
        first = int(real.float().argmax()) if bool(real.any()) else self.length
        if first:
            for name in self._buffers:  # one buffer at a time, the old one freed before the next
                old = getattr(self, name)
                buf = old.new_empty((*old.shape[:2], self.length - first + 64, *old.shape[3:]))
                buf[:, :, : self.length - first] = old[:, :, first : self.length]
                del old
                setattr(self, name, buf)
            self.length -= first
