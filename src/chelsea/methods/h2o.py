"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023): evict the entries with the least attention
accumulated over every query so far.

The cache (:class:`chelsea.cache.ClusteredLayer`) keeps the running sum of attention each entry
has received, from every prompt query and every decoded query, and passes it in as ``scores``.
"""

from __future__ import annotations

from ._eviction import evict_lowest


def h2o_evict(keys, values, log_counts, n_remove: int, *, scores, sink_tokens: int = 4, window: int = 64, **_):
    """Evict the ``n_remove`` entries with the lowest accumulated attention outside sinks and window.

    Returns ``(keys, values, log_counts, scores)``: the kept entries' scores go on accumulating.
    """
    return evict_lowest(keys, values, log_counts, scores, n_remove, sink_tokens, window, scores)


h2o_evict.uses_attention = True
h2o_evict.observation_window = None  # every query of a prompt adds to the scores
