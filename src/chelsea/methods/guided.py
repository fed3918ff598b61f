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

from ._eviction import evict_lowest, region_bounds
from .chelsea import _compute_dtype

MERGE_MODES = ("centroid", "values")


def _exact_mask(scores: torch.Tensor, kept: torch.Tensor, share: float) -> torch.Tensor:
    """The best ``share`` of the kept entries of each row, ranked over all heads together."""
    batch, heads, _ = scores.shape
    count = int(round(share * int(kept[0].sum())))
    if count <= 0:
        return torch.zeros_like(kept)
    ranked = scores.masked_fill(~kept, float("-inf")).flatten(1)
    top = ranked.topk(min(count, ranked.shape[1]), dim=1).indices
    return torch.zeros_like(ranked, dtype=torch.bool).scatter_(1, top, True).view(batch, heads, -1) & kept


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

    ``exact_share`` 1.0 is pure eviction by the scores (no representatives); 0.0 merges into every
    kept entry.
    """
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}; got {merge!r}")
    if not 0.0 <= exact_share <= 1.0:
        raise ValueError(f"exact_share must be in [0, 1]; got {exact_share}")
    length = keys.shape[2]
    start, end = region_bounds(length, sink_tokens, window)
    n_remove = min(max(0, int(n_remove)), end - start)
    if n_remove == 0:
        return keys, values, log_counts, scores
    region = scores[:, :, start:end]
    keep_n = region.shape[-1] - n_remove
    kept = torch.zeros_like(region, dtype=torch.bool)
    if keep_n > 0:
        kept.scatter_(-1, region.topk(keep_n, dim=-1).indices, True)
    exact = _exact_mask(region, kept, exact_share)
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
    drop_score = torch.where(kept, region, torch.full_like(region, float("-inf")))
    out = evict_lowest(new_keys, new_values, new_counts, drop_score, n_remove, 0, 0, region)
    return tuple(torch.cat([t[:, :, :start], r, t[:, :, end:]], dim=2) for t, r in zip((keys, values, log_counts, scores), out))


guided_merge.uses_importance = True
guided_merge.uses_surprise = True
guided_merge.uses_fact_heads = True  # CompressionConfig.fact_weight: chelsea.fact_heads
guided_merge.local_decode = True  # decoding re-clusters only the recent span (CompressionConfig.decode_span)
