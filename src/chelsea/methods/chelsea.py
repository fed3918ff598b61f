"""``chelsea``, the default: importance-guided clustering. Keep the important entries exact, merge (not drop) the rest.

Chelsea's merging alone averages a code's digits with their neighbours at high compression;
eviction by a good importance score (KVzip's reconstruction attention) keeps them but throws the
rest of the text away. This method does both, per layer, on scores from
:mod:`chelsea.scoring`:

1. Sinks and the recent window are kept as they are. In the region between them every
   (row, KV head) keeps its ``seq - n_remove`` best-scored entries (the layer stays one dense
   tensor; layers get uneven budgets from the cache, see :mod:`chelsea.scoring.budgets`).
2. Among the kept entries, the best ``exact_share`` of the layer, ranked over all its KV heads
   together (so heads get uneven exact budgets, as in AdaKV), are *exact*: never merged into, never
   merged away, returned bit for bit.
3. The other kept entries are *representatives*. Every entry that is not kept joins the
   representative whose key is most cosine-similar, within the same block of ``neighbourhood``
   consecutive region entries (similar keys are near each other: Chelsea's observation). The
   representative becomes the count-weighted centroid of its members (``merge="centroid"``) or
   keeps its own key and averages only the values (``merge="values"``); its log-count becomes the
   log of all the tokens it stands for, so attention weighs it like its members together. With
   ``fit`` on, the value and log-count are then fitted so that the prompt's last
   ``fit_queries`` queries read the merged entry as they read its members
   (:mod:`.fitted_merge`); compressions without such queries (while decoding) keep the average.
   An entry whose best similarity is below ``min_similarity``, or whose block has no
   representative, is dropped, as eviction would.

A merged entry keeps its representative's score (the highest of its members: everything not
kept scored lower). Tokens decoded later arrive with the learned scorer's score for them (the
default), ranked like the prompt's; with reconstruction scores they arrive with 0, so once they
leave the window they are the first to be merged into a similar representative. While decoding,
only the last ``decode_span`` entries before the window are re-clustered (where the new tokens
are), so a clustering costs the same at any context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..host import on_device
from ..settings import Importance, setting
from .base import Method, compute_dtype, region_bounds, register
from .fitted_merge import ReferenceQueries, fitted_merge_terms

MERGE_MODES = ("centroid", "values")


def _best(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the ``counts[b]`` highest ``scores`` along the last dimension of each row ``b``
    (``scores`` ``[B, ..., n]``, ``counts`` ``[B]`` on the same device); ties go to the earlier entry."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return rank < counts.view(-1, *([1] * (scores.dim() - 1)))


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


def merge_by_importance(
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
    fit: bool = False,
    references: ReferenceQueries | None = None,
    **_,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove ``n_remove`` entries per (row, head) between sinks and window, merging them into
    similar representatives. Returns ``(keys, values, log_counts, scores)`` of what is kept.

    ``n_remove`` may be a list, one number per batch row: row ``b`` then holds its entries in the
    first ``length - n_remove[b]`` slots (removals beyond the region are not made), and the slots
    after them, up to the longest row, are padding with log-count ``-inf``.

    ``exact_share`` 1.0 is pure eviction by the scores (no representatives); 0.0 merges into every
    kept entry. ``fit``: fit the merged entries' values and log-counts to the queries
    ``references`` (without them nothing is fitted).
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
    keep_n = [size - n for n in removed]
    kept, exact = _choose(scores[:, :, start:end], keep_n, exact_share)
    new_keys, new_values, new_counts = _merge_into_representatives(
        *(t[:, :, start:end] for t in (keys, values, log_counts)), kept, kept & ~exact, neighbourhood, min_similarity, merge,
        references if fit else None)
    whole = torch.ones(batch, heads, length, dtype=torch.bool, device=keys.device)
    whole[:, :, start:end] = kept

    def inside(full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:  # the region's new entries between sinks and window
        return torch.cat([full[:, :, :start], part, full[:, :, end:]], dim=2)

    return _compact((inside(keys, new_keys), inside(values, new_values), inside(log_counts, new_counts), scores), whole,
                    length - min(removed))


def _choose(region: torch.Tensor, keep_n: list[int], exact_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, exact)`` masks over the region scores ``[B, H, n]``: each (row, head) keeps its
    ``keep_n[row]`` best; the best ``exact_share`` of a row's kept entries, ranked over all heads
    together (uneven per head, as in AdaKV), are exact."""
    heads, device, rows = region.shape[1], region.device, len(keep_n)
    counts = on_device(keep_n + [int(round(exact_share * k * heads)) for k in keep_n], device)  # one copy to the device for both
    kept = _best(region, counts[:rows])
    exact = _best(region.masked_fill(~kept, float("-inf")).flatten(1), counts[rows:]).view_as(kept) & kept
    return kept, exact


def _merge_into_representatives(keys, values, log_counts, kept, reps, neighbourhood: int, min_similarity: float, merge: str,
                                references: ReferenceQueries | None = None):
    """The region's ``(keys, values, log_counts)`` after every entry that is not ``kept`` joined its
    most similar representative (``reps``) of its block, or was dropped (too dissimilar, or no
    representative): a representative that took members becomes their count-weighted centroid
    (``merge="values"``: only its value does) and stands for all their tokens."""
    work = compute_dtype(keys.dtype)
    best, target = _nearest_representative(keys, reps, neighbourhood)
    joins = ~kept & (best >= min_similarity) & log_counts.isfinite()
    # Each entry adds its weight to itself (kept) or to its representative (merged); dropped: nowhere.
    dest = torch.where(kept, torch.arange(keys.shape[2], device=keys.device).expand_as(target), target)
    weight = torch.where(kept | joins, log_counts.to(work).exp(), torch.zeros((), dtype=work, device=keys.device))
    total = torch.zeros_like(weight).scatter_add_(-1, dest, weight)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(x.shape, dtype=work, device=x.device)
        acc.scatter_add_(2, dest[..., None].expand_as(x), x.to(work) * weight[..., None])
        return acc / total.clamp_min(1e-30)[..., None]

    merged = reps & (total > weight)  # representatives that took members
    new_values = torch.where(merged[..., None], pooled(values).to(values.dtype), values)
    new_keys = keys if merge == "values" else torch.where(merged[..., None], pooled(keys).to(keys.dtype), keys)
    new_counts = torch.where(merged, total.log().to(log_counts.dtype), log_counts)
    if references is None:
        return new_keys, new_values, new_counts
    return (new_keys, *_fit(keys, values, log_counts, new_keys, new_values, new_counts, dest, kept | joins, merged, references,
                           neighbourhood))


def _fit(keys, values, log_counts, new_keys, new_values, new_counts, dest, members, merged, references, block: int):
    """``(values, log_counts)`` with every merged entry's value and log-count fitted to the
    reference queries (:mod:`.fitted_merge`); entries the fit cannot place keep the centroid's."""
    u, a2 = fitted_merge_terms(keys, log_counts, new_keys, dest, references, block)
    u = u.masked_fill(~members, 0.0)
    mass = torch.zeros_like(u).scatter_add_(-1, dest, u)
    log_beta = mass.log() - a2.log()  # apart, so a tiny a2 cannot overflow the quotient
    fitted = merged & log_beta.isfinite()
    share = (u / mass.gather(-1, dest)).nan_to_num(0.0)  # each member's part of its cluster's value
    acc = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    acc.scatter_add_(2, dest[..., None].expand_as(values), values.float() * share[..., None])
    return (torch.where(fitted[..., None], acc.to(values.dtype), new_values),
            torch.where(fitted, log_beta.to(new_counts.dtype), new_counts))


def _compact(tensors: tuple[torch.Tensor, ...], keep: torch.Tensor, out_len: int) -> tuple[torch.Tensor, ...]:
    """The entries of each tensor ``[B, H, n, ...]`` where ``keep`` ``[B, H, n]``, moved to the
    front in sequence order, ``out_len`` slots; a (row, head) that keeps fewer is padded at the end
    (log-count ``-inf``, the third tensor; zeros elsewhere)."""
    slot = torch.where(keep, keep.long().cumsum(-1) - 1, out_len)

    def move(i: int, x: torch.Tensor) -> torch.Tensor:
        out = x.new_full((*x.shape[:2], out_len + 1, *x.shape[3:]), float("-inf") if i == 2 else 0)
        return out.scatter_(2, slot if x.dim() == 3 else slot[..., None].expand_as(x), x)[:, :, :out_len]

    return tuple(move(i, x) for i, x in enumerate(tensors))



@register
@dataclass(frozen=True)
class Chelsea(Method):
    """Importance-guided clustering: the important entries exact, the rest merged into similar kept ones."""

    name = "chelsea"
    summary = "importance-guided clustering (the default): important entries kept exact, the rest merged into similar representatives"
    paper = "ours, after Chelsea (arXiv 2506.11418) and KVzip (arXiv 2505.23416)"
    scores = "importance"
    local_decode = True
    rowwise_remove = True

    exact_share: float = setting(0.5, "share of the kept entries, ranked over the layer's KV heads, kept exact; the rest "
                                      "absorb what is not kept (1.0: eviction)", low=0.0, high=1.0)
    merge: str = setting("centroid", "a representative becomes the count-weighted 'centroid' of its members, or keeps its key "
                                     "and averages the 'values'", choices=MERGE_MODES)
    fit: bool = setting(False, "fit each merged entry's value and log-count to the attention of the prompt's last queries "
                               "(least squares, same bytes; decoding-time compressions keep the average)")
    fit_queries: int = setting(64, "with fit: the forward's last N queries (per query head) the merged entries are fitted to",
                               low=1)
    min_similarity: float = setting(0.0, "entries less cosine-similar than this to every representative are dropped, not merged",
                                    low=-1.0, high=1.0)
    neighbourhood: int = setting(128, "entries look for a representative within blocks of this many region entries", low=2)
    decode_span: int | None = setting(256, "while decoding, compress only the last N entries before the window, so the work "
                                           "per compression does not grow with the context", kind=int, low=2,
                                      none="the whole cache")
    scoring: Importance = field(default_factory=Importance)

    @property
    def references(self) -> int:
        return self.fit_queries if self.fit else 0

    def compress(self, keys, values, log_counts, n_remove, *, sink_tokens, window, scores=None, references=None):
        return merge_by_importance(keys, values, log_counts, n_remove, scores=scores, sink_tokens=sink_tokens, window=window,
                                   exact_share=self.exact_share, min_similarity=self.min_similarity,
                                   neighbourhood=self.neighbourhood, merge=self.merge, fit=self.fit,
                                   references=references)
