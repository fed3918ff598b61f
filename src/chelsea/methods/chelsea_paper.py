"""``chelsea-paper``: Chelsea's chunked soft matching of the KV cache (arXiv 2506.11418, later called CentroidKV).

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
from dataclasses import dataclass

import torch

from ..kernels import soft_matching as soft_matching_kernels
from ..settings import setting
from .base import Method, compute_dtype, region_bounds, register


def max_removable(region_len: int, chunk_size: int) -> int:
    """Entries one merge step can remove from a region of ``region_len``: the size of set A."""
    full, rest = divmod(region_len, chunk_size)
    return full * (chunk_size // 2) + rest // 2


def _best_edges(keys: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every A entry's best cosine similarity to a B entry of its chunk and that B entry's position,
    ``[batch, heads, A entries]`` in sequence order; a trailing partial chunk has its own A/B split."""
    batch, heads, length, _ = keys.shape
    unit = keys.to(compute_dtype(keys.dtype), copy=True)
    unit /= torch.linalg.vector_norm(unit, dim=-1, keepdim=True).clamp_min(1e-12)
    sims, b_pos = [], []
    body = length // chunk_size * chunk_size
    for start, end, size in ((0, body, chunk_size), (body, length, length - body)):
        if end - start < 2:
            continue
        chunks = unit[:, :, start:end].unflatten(2, ((end - start) // size, size))
        sim = chunks[..., 1::2, :] @ chunks[..., 0::2, :].transpose(-1, -2)  # [batch, heads, chunks, |A|, |B|]
        best_sim, best_b = sim.max(dim=-1)
        first = torch.arange(start, end, size, device=keys.device)[:, None]
        sims.append(best_sim.flatten(2))
        b_pos.append((first + 2 * best_b).flatten(2))
    if not sims:
        return unit.new_empty(batch, heads, 0), torch.zeros(batch, heads, 0, dtype=torch.long, device=keys.device)
    return torch.cat(sims, -1), torch.cat(b_pos, -1)


def _a_positions(length: int, chunk_size: int, device: torch.device) -> torch.Tensor:
    """Positions of the A entries (odd offsets in each chunk, a trailing partial chunk included)
    in sequence order."""
    a = torch.arange(max_removable(length, chunk_size), device=device)
    return a // (chunk_size // 2) * chunk_size + a % (chunk_size // 2) * 2 + 1


def _merge_edges(
    keys: torch.Tensor,
    values: torch.Tensor,
    log_counts: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every A entry ``src`` ``[batch, heads, r]`` into its B entry ``dst``: each B entry and
    the A entries pointing at it become one count-weighted centroid at B's place. Returns the
    ``length - r`` entries left, in order."""
    batch, heads, length, _ = keys.shape
    work = compute_dtype(keys.dtype)
    device = keys.device
    # Group the edges by their B entry (one centroid per B): number the B entries that receive
    # edges in sequence order. A cumulative sum over the region, no sort, no host sync.
    is_dst = torch.zeros(batch, heads, length, dtype=torch.bool, device=device).scatter_(-1, dst, True)
    group = (is_dst.long().cumsum(-1) - 1).gather(-1, dst)

    weight = log_counts.to(work).exp()
    w_src, w_dst = weight.gather(-1, src), weight.gather(-1, dst)
    total = torch.zeros_like(w_src).scatter_add_(-1, group, w_src)
    total = total.gather(-1, group) + w_dst  # per edge: its centroid's count

    def centroids(x: torch.Tensor) -> torch.Tensor:
        """The merged rows, one per edge (edges into one B entry get the same row)."""
        gather = lambda pos: x.gather(2, pos[..., None].expand(-1, -1, -1, x.shape[-1])).to(work)  # noqa: E731
        idx = group[..., None].expand(-1, -1, -1, x.shape[-1])
        acc = torch.zeros(*group.shape, x.shape[-1], dtype=work, device=device)
        acc.scatter_add_(2, idx, gather(src) * w_src[..., None])
        return (acc.gather(2, idx) + gather(dst) * w_dst[..., None]) / total[..., None]

    new_keys, new_values = centroids(keys), centroids(values)

    # Kept entries in order (each to its rank among the kept; removed ones to a spill slot);
    # the centroids then overwrite their B entries' new places.
    keep = torch.ones(batch, heads, length, dtype=torch.bool, device=device).scatter_(-1, src, False)
    rank = keep.long().cumsum(-1) - 1
    out_len = length - src.shape[-1]
    kept = torch.empty(batch, heads, out_len + 1, dtype=torch.long, device=device)
    kept.scatter_(-1, torch.where(keep, rank, out_len), torch.arange(length, device=device).expand(batch, heads, -1))
    kept = kept[..., :out_len]
    new_place = rank.gather(-1, dst)

    def compact(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return x.gather(-1, kept).scatter_(-1, new_place, rows.to(x.dtype))
        out = x.gather(2, kept[..., None].expand(-1, -1, -1, x.shape[-1]))
        return out.scatter_(2, new_place[..., None].expand(-1, -1, -1, x.shape[-1]), rows.to(x.dtype))

    return compact(keys, new_keys), compact(values, new_values), compact(log_counts, total.log())


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

    No sort and no host sync. On CUDA the chunk-local parts (best edges, centroids and compaction)
    run as Triton kernels (:mod:`chelsea.kernels.soft_matching`); elsewhere as PyTorch ops:
    one float32 pass over the keys for the similarities, small tensors for the ``n_remove``
    merges, one gather of the kept entries.
    """
    length = keys.shape[2]
    if n_remove <= 0:
        return keys, values, log_counts
    if n_remove > max_removable(length, chunk_size):
        raise ValueError(f"one step cannot remove {n_remove} of {length} entries with chunks of {chunk_size}")
    on_gpu = soft_matching_kernels.kernel_applies(keys, values, log_counts, chunk_size)
    sims, b_pos = (soft_matching_kernels.best_edges if on_gpu else _best_edges)(keys, chunk_size)
    chosen = sims.topk(n_remove, dim=-1, sorted=False).indices  # [batch, heads, r]
    if on_gpu:
        return soft_matching_kernels.merge_chosen(keys, values, log_counts, b_pos, chosen, chunk_size)
    src = _a_positions(length, chunk_size, keys.device)[chosen]  # A entries that disappear
    dst = torch.gather(b_pos, -1, chosen)  # the B entries they join
    return _merge_edges(keys, values, log_counts, src, dst)


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
    start, end = region_bounds(length, sink_tokens, window)
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



@register
@dataclass(frozen=True)
class ChelseaPaper(Method):
    """The paper's method: merge the most similar neighbours of each chunk, by similarity alone."""

    name = "chelsea-paper"
    summary = "the paper's chunked soft matching: similar neighbouring keys merged into count-weighted centroids"
    paper = "Chelsea, arXiv 2506.11418"
    local_decode = True

    chunk_size: int = setting(32, "consecutive entries searched together for matches (C in the paper)", low=2)
    step_fraction: float = setting(0.5, "largest share of set A merged in one step; steps repeat on the shrunk sequence",
                                   low=0.0, low_open=True, high=1.0)
    decode_span: int | None = setting(256, "while decoding, compress only the last N entries before the window, so the work "
                                           "per compression does not grow with the context", kind=int, low=2,
                                      none="the whole cache")

    @property
    def compress_every(self) -> int:
        return self.chunk_size

    def compress(self, keys, values, log_counts, n_remove, *, sink_tokens, window, scores=None):
        return chunked_soft_matching(keys, values, log_counts, n_remove, chunk_size=self.chunk_size, sink_tokens=sink_tokens,
                                     window=window, step_fraction=self.step_fraction)
