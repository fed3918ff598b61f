"""``knorm``, key-norm eviction (Devoto et al., 2024): keys with a large L2 norm tend to get little
attention, so the entries with the largest key norms are evicted first."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, register
from .eviction import evict_lowest


@register
@dataclass(frozen=True)
class KNorm(Method):
    """The largest key norms go first."""

    name = "knorm"
    summary = "eviction of the largest key norms first"
    paper = "Devoto et al., arXiv 2406.11430"

    def compress(self, keys, values, log_counts, n_remove, *, sink_tokens, window, scores=None):
        score = -torch.linalg.vector_norm(keys.float(), dim=-1)
        return evict_lowest(keys, values, log_counts, score, n_remove, sink_tokens, window)
