"""Importance-guided clustering: keep the important entries exact, merge (not drop) the rest.

Chelsea's merging alone averages a code's digits with their neighbours at high compression;
eviction by a good importance score (KVzip's reconstruction attention) keeps them but throws the
rest of the text away. This method does both, per layer, on scores from
:mod:`chelsea.importance`:

1. Sinks and the recent window are kept as they are. In the region between them every
   (row, KV head) keeps its ``seq - n_remove`` best-scored entries (the layer stays one dense
   tensor; layers get uneven budgets from the cache, see :mod:`chelsea.methods._budgets`).
2. Among the kept entries, the best ``exact_share`` of the layer, ranked over all its KV heads
   together (so heads get uneven exact budgets, as in AdaKV), are *exact*: never merged into, never
   merged away, returned bit for bit.
3. The other kept entries are *representatives*. Every entry that is not kept joins the
   representative whose key is most cosine-similar, within the same block of ``neighbourhood``
   consecutive region entries (similar keys are near each other: Chelsea's observation). The
   representative becomes the count-weighted centroid of its members (``merge="centroid"``) or
   keeps its own key and averages only the values (``merge="values"``); its log-count becomes the
   log of all the tokens it stands for, so attention weighs it like its members together.
   An entry whose best similarity is below ``min_similarity``, or whose block has no
   representative, is dropped, as eviction would.

A merged entry keeps its representative's score (the highest of its members: everything not
kept scored lower). Tokens decoded later arrive with score 0: once they leave the window they are
the first to be merged into a similar representative, never into an exact entry. While decoding,
only the last ``decode_span`` entries before the window are re-clustered (where the new tokens
are), so a clustering costs the same at any context length.
"""

from __future__ import annotations

import torch

from ._eviction import region_bounds
from .chelsea import _compute_dtype

MERGE_MODES = ("centroid", "values")


def _best(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the ``counts[b]`` highest ``scores`` along the last dimension of each row ``b``
    (``scores`` ``[B, ..., n]``, ``counts`` ``[B]`` on the same device); ties go to the earlier entry."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return rank < counts.view(-1, *([1] * (scores.dim() - 1)))


def _on(device: torch.device, numbers: list[int]) -> torch.Tensor:
    """``numbers`` as a long tensor on ``device``, copied without waiting for the device's queue."""
    host = torch.tensor(numbers, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _nearest_representative(keys: torch.Tensor, reps: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every entry, the most similar representative of its block and that similarity
    (``-inf`` where the block has none). ``keys`` ``[B, H, n, d]``, ``reps`` ``[B, H, n]`` bool."""
    batch, heads, n, dim = keys.shape
    pad = (-n) % block
    unit = keys.float()
    unit = unit / torch.linalg.vector_norm(unit, dim=-1, keepdim=True).clamp_min(1e-12)
    if pad:
        unit = torch.cat([unit, unit.new_zeros(batch, heads, pad, dim)], 2)
        reps = torch.cat([reps, reps.new_zeros(batch, heads, pad)], 2)
    blocks = (n + pad) // block
    unit = unit.view(batch, heads, blocks, block, dim)
    sims = unit @ unit.transpose(-1, -2)  # [B, H, blocks, block, block]
    sims = sims.masked_fill(~reps.view(batch, heads, blocks, 1, block), float("-inf"))
    best, where = sims.max(-1)
    start = torch.arange(0, n + pad, block, device=keys.device).view(1, 1, blocks, 1)
    return best.flatten(2)[..., :n], (where + start).flatten(2)[..., :n]


def guided_merge(
    keys: torch.Tensor,
    values: torch.Tensor,
    log_counts: torch.Tensor,
    n_remove: int,
    *,
    scores: torch.Tensor,
    sink_tokens: int = 4,
    window: int = 64,
    exact_share: float = 0.5,
    min_similarity: float = 0.0,
    neighbourhood: int = 128,
    merge: str = "centroid",
    **_,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove ``n_remove`` entries per (row, head) between sinks and window, merging them into
    similar representatives. Returns ``(keys, values, log_counts, scores)`` of what is kept.

    ``n_remove`` may be a list, one number per batch row: row ``b`` then holds its entries in the
    first ``length - n_remove[b]`` slots (removals beyond the region are not made), and the slots
    after them, up to the longest row, are padding with log-count ``-inf``.

    ``exact_share`` 1.0 is pure eviction by the scores (no representatives); 0.0 merges into every
    kept entry.
    """
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}; got {merge!r}")
    if not 0.0 <= exact_share <= 1.0:
        raise ValueError(f"exact_share must be in [0, 1]; got {exact_share}")
    batch, heads, length = keys.shape[:3]
    start, end = region_bounds(length, sink_tokens, window)
    size = end - start
    removed = [min(max(0, int(n)), size) for n in (n_remove if isinstance(n_remove, (list, tuple)) else [n_remove] * batch)]
    if len(removed) != batch:
        raise ValueError(f"n_remove has {len(removed)} entries for {batch} rows")
    if max(removed) == 0:
        return keys, values, log_counts, scores
    region = scores[:, :, start:end]
    keep_n = [size - n for n in removed]
    kept = _best(region, _on(keys.device, keep_n))
    # The best exact_share of each row's kept entries, ranked over all heads together (uneven per head, as in AdaKV).
    exact_n = _on(keys.device, [int(round(exact_share * k * heads)) for k in keep_n])
    exact = _best(region.masked_fill(~kept, float("-inf")).flatten(1), exact_n).view_as(kept) & kept
    reps = kept & ~exact

    work = _compute_dtype(keys.dtype)
    r_keys, r_values, r_counts = (t[:, :, start:end] for t in (keys, values, log_counts))
    best, target = _nearest_representative(r_keys, reps, neighbourhood)
    joins = ~kept & (best >= min_similarity) & r_counts.isfinite()
    # Each entry adds its weight to itself (kept) or to its representative (merged); dropped: nowhere.
    dest = torch.where(kept, torch.arange(region.shape[-1], device=keys.device).expand_as(target), target)
    weight = torch.where(kept | joins, r_counts.to(work).exp(), torch.zeros((), dtype=work, device=keys.device))
    total = torch.zeros_like(weight).scatter_add_(-1, dest, weight)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(x.shape, dtype=work, device=x.device)
        acc.scatter_add_(2, dest[..., None].expand_as(x), x.to(work) * weight[..., None])
        return acc / total.clamp_min(1e-30)[..., None]

    merged = reps & (total > weight)  # representatives that took members
    new_values = torch.where(merged[..., None], pooled(r_values).to(values.dtype), r_values)
    new_keys = torch.where(merged[..., None], pooled(r_keys).to(keys.dtype), r_keys) if merge == "centroid" else r_keys
    new_counts = torch.where(merged, total.log().to(log_counts.dtype), r_counts)
    whole = torch.ones(batch, heads, length, dtype=torch.bool, device=keys.device)
    whole[:, :, start:end] = kept

    def inside(full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:  # the region's new entries between sinks and window
        return torch.cat([full[:, :, :start], part, full[:, :, end:]], dim=2)

    return _compact((inside(keys, new_keys), inside(values, new_values), inside(log_counts, new_counts), scores), whole,
                    length - min(removed))


def _compact(tensors: tuple[torch.Tensor, ...], keep: torch.Tensor, out_len: int) -> tuple[torch.Tensor, ...]:
    """The entries of each tensor ``[B, H, n, ...]`` where ``keep`` ``[B, H, n]``, moved to the
    front in sequence order, ``out_len`` slots; a (row, head) that keeps fewer is padded at the end
    (log-count ``-inf``, the third tensor; zeros elsewhere)."""
    slot = torch.where(keep, keep.long().cumsum(-1) - 1, out_len)

    def move(i: int, x: torch.Tensor) -> torch.Tensor:
        out = x.new_full((*x.shape[:2], out_len + 1, *x.shape[3:]), float("-inf") if i == 2 else 0)
        return out.scatter_(2, slot if x.dim() == 3 else slot[..., None].expand_as(x), x)[:, :, :out_len]

    return tuple(move(i, x) for i, x in enumerate(tensors))


guided_merge.uses_importance = True
guided_merge.uses_surprise = True
guided_merge.uses_fact_heads = True  # CompressionConfig.fact_weight: chelsea.fact_heads
guided_merge.local_decode = True  # decoding re-clusters only the recent span (CompressionConfig.decode_span)
guided_merge.rowwise_remove = True  # n_remove may differ per row: the layers of a decoding step cluster as one batch
