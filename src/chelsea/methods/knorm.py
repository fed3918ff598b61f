"""Key-norm eviction (Devoto et al., 2024): keys with a large L2 norm tend to get little attention,
so the entries with the largest key norms are evicted first."""

from __future__ import annotations

import torch

from ._eviction import evict_lowest


def knorm_evict(keys, values, log_counts, n_remove: int, *, sink_tokens: int = 4, window: int = 64, **_):
    """Evict the ``n_remove`` entries with the largest key norm outside sinks and window."""
    score = -torch.linalg.vector_norm(keys.float(), dim=-1)
    return evict_lowest(keys, values, log_counts, score, n_remove, sink_tokens, window)
