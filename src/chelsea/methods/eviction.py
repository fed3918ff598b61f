"""Shared step of the eviction baselines: drop the lowest-scored entries between sinks and window."""

from __future__ import annotations

import torch

from .base import region_bounds


def evict_lowest(
    keys: torch.Tensor,
    values: torch.Tensor,
    log_counts: torch.Tensor,
    scores: torch.Tensor,
    n_remove: int,
    sink_tokens: int,
    window: int,
    *extra: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Remove the ``n_remove`` entries with the lowest ``scores`` ``[B, H, seq]`` outside the protected
    sinks and window (at most the whole region), keeping the rest in sequence order.

    Returns the kept ``keys``, ``values``, ``log_counts`` and each of ``extra`` (per-entry tensors
    ``[B, H, seq, ...]`` that travel with the entries)."""
    length = keys.shape[2]
    start, end = region_bounds(length, sink_tokens, window)
    n_remove = min(max(0, int(n_remove)), end - start)
    if n_remove == 0:
        return (keys, values, log_counts, *extra)
    region = scores[:, :, start:end]
    drop = region.topk(n_remove, dim=-1, largest=False).indices + start
    keep = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, drop, False)
    index = keep.long().cumsum(-1) - 1
    out_len = length - n_remove
    slot = torch.where(keep, index, out_len)

    def compact(x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:2], out_len + 1, *x.shape[3:])
        idx = slot if x.dim() == 3 else slot[..., None].expand_as(x)
        return x.new_zeros(shape).scatter_(2, idx, x)[:, :, :out_len]

    return tuple(compact(x) for x in (keys, values, log_counts, *extra))
