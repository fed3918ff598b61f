"""KVzip (Kim et al., 2025, arXiv 2505.23416) as an eviction baseline: keep the entries the model
needs most to reconstruct its context, drop the rest.

The scores come from :func:`chelsea.importance.score_by_reconstruction` (each entry's largest
attention from the queries that repeat the context); this function only evicts by them. Layers
get uneven budgets from the same scores (:func:`chelsea.methods._budgets.layer_shares`, done by
the cache); inside a layer every KV head keeps the same number of entries, so the layer stays one
dense tensor and the bytes it reports are the bytes it holds (kvpress's KVzipPress ranks over all
heads too, but only masks entries: they stay in memory).

Without a reconstruction pass (a plain ``model.generate``), the scores are the attention of the
prompt's last queries, as for SnapKV without pooling.
"""

from __future__ import annotations

from ._eviction import evict_lowest


def kvzip_evict(keys, values, log_counts, n_remove: int, *, scores, sink_tokens: int = 4, window: int = 64, **_):
    """Evict the ``n_remove`` entries with the lowest importance ``scores`` ``[batch, kv_heads, seq]``
    outside sinks and window. Returns ``(keys, values, log_counts, scores)`` of the kept entries."""
    return evict_lowest(keys, values, log_counts, scores, n_remove, sink_tokens, window, scores)


kvzip_evict.uses_importance = True
