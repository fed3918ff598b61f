"""Chelsea: chunked soft matching of the KV cache (arXiv 2506.11418, later called CentroidKV).

Plain tensor functions, no model inside. Inputs are one layer's keys and values shaped
``[batch, kv_heads, seq, head_dim]`` and the per-entry log-counts ``[batch, kv_heads, seq]``
(``log(number of original tokens an entry stands for)``; 0 for a raw token). Every KV head of every
batch row is clustered on its own, so grouped-query models need nothing special and nothing is
ever merged across rows or heads.

One merge step, per (row, head):

1. The first ``sink_tokens`` entries and the last ``window`` entries are protected; the rest is the
   region.
2. The region is cut into chunks of ``chunk_size`` consecutive entries. Inside a chunk, entries at
   odd offsets form set A and entries at even offsets form set B (the alternating split that the
   paper shows is optimal when key similarity decreases convexly with distance).
3. Every A entry finds its most cosine-similar B entry in the same chunk.
4. The ``r`` most similar A->B edges of the whole region are kept. Each B entry and the A entries
   that point at it become one centroid: keys and values averaged with weights equal to the
   counts, log-count = log(sum of counts). The merged A entries are removed; the centroid sits at
   B's place, so the sequence order of what remains is preserved.

A step removes at most all of A, so at most about half the region. :func:`chunked_soft_matching`
lets one step merge at most ``step_fraction`` of A (0.5 by default) and repeats steps on the
shrunk sequence until the requested number of entries is gone or nothing is left to merge. On
SmolLM2-135M with a pass key in 1.9K tokens of filler, one all-of-A step lost the key at ratio 0.5
(0 of 8 prompts; neighbouring digits get averaged) while half-steps kept it (8 of 8 at 0.5 and 0.8).

Choices the paper leaves open, made here:
- A trailing partial chunk is used as it is (its own A/B split); it is not dropped or padded in.
- Similarity and centroids are computed in float32 (float64 when the input is float64) and cast
  back, so bf16 caches do not lose precision by repeated averaging.
- Ties between equally similar edges are broken by ``torch.topk`` (deterministic on one device).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def max_removable(region_len: int, chunk_size: int) -> int:
    """Entries one merge step can remove from a region of ``region_len``: the size of set A."""
    full, rest = divmod(region_len, chunk_size)
    return full * (chunk_size // 2) + rest // 2


def soft_matching_step(
    keys: torch.Tensor,
    values: torch.Tensor,
    log_counts: torch.Tensor,
    n_remove: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``n_remove`` entries out of a whole region (no protected tokens) in one step.

    ``n_remove`` must be at most :func:`max_removable` of the region length. Returns the region
    with ``seq - n_remove`` entries, in the original order.
    """
    batch, heads, length, _ = keys.shape
    if n_remove <= 0:
        return keys, values, log_counts
    if n_remove > max_removable(length, chunk_size):
        raise ValueError(f"one step cannot remove {n_remove} of {length} entries with chunks of {chunk_size}")
    work = _compute_dtype(keys.dtype)
    device = keys.device
    n_chunks = math.ceil(length / chunk_size)
    padded = n_chunks * chunk_size

    unit = F.normalize(keys.to(work), dim=-1)
    unit = F.pad(unit, (0, 0, 0, padded - length)).view(batch, heads, n_chunks, chunk_size, -1)
    a_unit, b_unit = unit[..., 1::2, :], unit[..., 0::2, :]
    sim = a_unit @ b_unit.transpose(-1, -2)  # [batch, heads, chunks, |A|, |B|]

    offsets = torch.arange(chunk_size, device=device)
    chunk_start = torch.arange(n_chunks, device=device)[:, None] * chunk_size
    position = chunk_start + offsets  # [chunks, chunk]
    real = position < length
    b_real, a_real = real[:, 0::2], real[:, 1::2]
    sim = sim.masked_fill(~b_real[:, None, :], float("-inf"))
    best_sim, best_b = sim.max(dim=-1)  # [batch, heads, chunks, |A|]
    best_sim = best_sim.masked_fill(~a_real, float("-inf"))

    a_pos = position[:, 1::2].expand(batch, heads, -1, -1)
    b_pos = torch.gather(position[:, 0::2].expand(batch, heads, -1, -1), -1, best_b)
    chosen = best_sim.flatten(2).topk(n_remove, dim=-1).indices
    src = torch.gather(a_pos.flatten(2), -1, chosen)  # A entries that disappear
    dst = torch.gather(b_pos.flatten(2), -1, chosen)  # the B entries they join

    weight = log_counts.to(work).exp()
    total = weight.scatter_add(-1, dst, torch.gather(weight, -1, src))

    def merge(x: torch.Tensor) -> torch.Tensor:
        weighted = x.to(work) * weight[..., None]
        idx = src[..., None].expand(-1, -1, -1, x.shape[-1])
        weighted = weighted.scatter_add(-2, dst[..., None].expand_as(idx), torch.gather(weighted, -2, idx))
        return weighted / total[..., None]

    merged_keys, merged_values = merge(keys), merge(values)
    is_dst = torch.zeros_like(weight, dtype=torch.bool).scatter_(-1, dst, True)
    # Entries that are not centroids stay bit-identical.
    merged_keys = torch.where(is_dst[..., None], merged_keys.to(keys.dtype), keys)
    merged_values = torch.where(is_dst[..., None], merged_values.to(values.dtype), values)
    merged_log = torch.where(is_dst, total.log().to(log_counts.dtype), log_counts)

    # Compact without a host sync: kept entries go to their rank, removed ones to a spill slot.
    keep = torch.ones_like(is_dst).scatter_(-1, src, False)
    slot = torch.where(keep, keep.long().cumsum(-1) - 1, length - n_remove)
    out_len = length - n_remove

    def compact(x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:2], out_len + 1, *x.shape[3:])
        index = slot if x.dim() == 3 else slot[..., None].expand_as(x)
        return x.new_zeros(shape).scatter_(2, index, x)[:, :, :out_len]

    return compact(merged_keys), compact(merged_values), compact(merged_log)


def chunked_soft_matching(
    keys: torch.Tensor,
    values: torch.Tensor,
    log_counts: torch.Tensor,
    n_remove: int,
    *,
    chunk_size: int = 32,
    sink_tokens: int = 4,
    window: int = 64,
    step_fraction: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove up to ``n_remove`` entries per (row, head) by repeated soft-matching steps.

    A step merges at most ``step_fraction`` of set A (the most similar edges), then matches again
    on the shrunk sequence; smaller fractions spend more steps and leave dissimilar entries alone.

    Sinks (the first ``sink_tokens``) and the recent ``window`` entries are returned bit-identical.
    Fewer than ``n_remove`` entries are removed only when the region between them has shrunk to a
    single entry. Every row and head loses the same number of entries, so the result stays one
    rectangular tensor ``[batch, kv_heads, seq - removed, head_dim]``.
    """
    if keys.dim() != 4 or values.dim() != 4 or log_counts.dim() != 3:
        raise ValueError("keys/values must be [batch, kv_heads, seq, head_dim] and log_counts [batch, kv_heads, seq]")
    if keys.shape[:3] != values.shape[:3] or keys.shape[:3] != log_counts.shape:
        raise ValueError(
            f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and log_counts {tuple(log_counts.shape)} disagree"
        )
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be at least 2, got {chunk_size}")
    if sink_tokens < 0 or window < 0:
        raise ValueError(f"sink_tokens and window must be >= 0, got {sink_tokens} and {window}")
    length = keys.shape[2]
    start, end = min(sink_tokens, length), max(min(sink_tokens, length), length - window)
    region = [t[:, :, start:end] for t in (keys, values, log_counts)]
    remaining = max(0, int(n_remove))
    while remaining > 0:
        step = min(remaining, math.ceil(step_fraction * max_removable(region[0].shape[2], chunk_size)))
        if step == 0:
            break
        region = list(soft_matching_step(*region, step, chunk_size))
        remaining -= step
    if region[0].shape[2] == end - start:
        return keys, values, log_counts
    return tuple(torch.cat([t[:, :, :start], r, t[:, :, end:]], dim=2) for t, r in zip((keys, values, log_counts), region))
