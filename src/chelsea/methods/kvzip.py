"""``kvzip`` (Kim et al., 2025, arXiv 2505.23416) as an eviction baseline: keep the entries the model
needs most to reconstruct its context, drop the rest.

The scores come from :mod:`chelsea.scoring` (each entry's largest attention from the queries that
repeat the context); this method only evicts by them. Layers get uneven budgets from the same
scores (:func:`chelsea.scoring.budgets.layer_shares`); inside a layer every KV head keeps the same
number of entries, so the layer stays one dense tensor and the bytes it reports are the bytes it
holds (kvpress's KVzipPress ranks over all heads too, but only masks entries: they stay in memory).

Without a reconstruction pass (a plain ``model.generate``), the scores are the attention of the
prompt's last queries, as for SnapKV without pooling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..settings import Importance
from .base import Method, register
from .eviction import evict_lowest


@register
@dataclass(frozen=True)
class KVzip(Method):
    """Eviction by context-reconstruction importance, with uneven layer budgets."""

    name = "kvzip"
    summary = "eviction by context-reconstruction importance (KVzip), uneven layer budgets"
    paper = "KVzip, arXiv 2505.23416"
    scores = "importance"

    scoring: Importance = field(default_factory=lambda: Importance(importance="local", surprise_weight=0.0, fact_weight=0.0))

    def compress(self, keys, values, log_counts, n_remove, *, sink_tokens, window, scores=None):
        return evict_lowest(keys, values, log_counts, scores, n_remove, sink_tokens, window, scores)
