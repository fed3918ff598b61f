"""``h2o``, Heavy-Hitter Oracle (Zhang et al., 2023): evict the entries with the least attention
accumulated over every query so far.

The cache keeps the running sum of attention each entry has received, from every prompt query and
every decoded query (``scores = "attention"``), and passes it in as ``scores``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, register
from .eviction import evict_lowest


@register
@dataclass(frozen=True)
class H2O(Method):
    """Eviction of the least accumulated attention; the kept entries' scores go on accumulating."""

    name = "h2o"
    summary = "eviction of the entries with the least attention accumulated so far (H2O)"
    paper = "H2O, arXiv 2306.14048"
    scores = "attention"
    observation_window = None  # every query of a prompt adds to the scores

    def compress(self, keys, values, log_counts, n_remove, *, sink_tokens, window, scores=None):
        return evict_lowest(keys, values, log_counts, scores, n_remove, sink_tokens, window, scores)
