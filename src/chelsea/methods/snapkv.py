"""``snapkv`` (Li et al., 2024): rank entries by the attention they get from the last prompt tokens,
smoothed over neighbouring positions, and evict the lowest.

The observation window is the last ``observation_window`` queries of the prompt; queries decoded
later add to the same scores, so the window keeps extending while the answer is generated. The
pooling keeps the neighbours of an attended token too, so a fact is kept whole rather than as
isolated tokens. Strong when the question comes after the context (the window sees it); it knows
nothing of a question that comes later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..settings import setting
from .base import Method, register
from .eviction import evict_lowest

OBSERVATION_WINDOW = 32


@register
@dataclass(frozen=True)
class SnapKV(Method):
    """Eviction by the last prompt queries' attention, pooled over neighbouring positions."""

    name = "snapkv"
    summary = "eviction by the attention of the prompt's last 32 queries, pooled over 7 positions (SnapKV)"
    paper = "SnapKV, arXiv 2404.14469"
    scores = "attention"
    observation_window = OBSERVATION_WINDOW

    pool: int = setting(7, "positions the observation scores are averaged over, so a phrase survives together", low=1)

    def compress(self, keys, values, log_counts, n_remove, *, sink_tokens, window, scores=None):
        """Evict by the pooled scores; the kept entries keep their raw, unpooled scores."""
        batch, heads, length = scores.shape
        if length == 0:  # nothing to pool (avg_pool1d rejects an empty row)
            return keys, values, log_counts, scores
        pooled = F.avg_pool1d(scores.reshape(batch * heads, 1, length), self.pool, stride=1, padding=self.pool // 2,
                              count_include_pad=False).reshape(batch, heads, -1)[..., :length]
        return evict_lowest(keys, values, log_counts, pooled, n_remove, sink_tokens, window, scores)
