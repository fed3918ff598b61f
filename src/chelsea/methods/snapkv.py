"""SnapKV (Li et al., 2024): rank entries by the attention they get from the last prompt tokens,
smoothed over neighbouring positions, and evict the lowest.

The observation window is the last ``observation_window`` queries of the prompt; queries decoded
later add to the same scores, so the window keeps extending while the answer is generated. The
pooling keeps the neighbours of an attended token too, so a fact is kept whole rather than as
isolated tokens. Strong when the question comes after the context (the window sees it); it knows
nothing of a question that comes later.
"""

from __future__ import annotations

import torch.nn.functional as F

from ._eviction import evict_lowest

OBSERVATION_WINDOW = 32
POOL_KERNEL = 7


def snapkv_evict(
    keys, values, log_counts, n_remove: int, *, scores, sink_tokens: int = 4, window: int = 64, pool: int = POOL_KERNEL, **_
):
    """Evict the ``n_remove`` entries with the lowest pooled observation-window attention.

    Returns ``(keys, values, log_counts, scores)`` (the kept entries' raw, unpooled scores).
    """
    batch, heads, length = scores.shape
    if length == 0:  # nothing to pool (avg_pool1d rejects an empty row)
        return keys, values, log_counts, scores
    pooled = F.avg_pool1d(
        scores.reshape(batch * heads, 1, length), pool, stride=1, padding=pool // 2, count_include_pad=False
    ).reshape(batch, heads, length)
    return evict_lowest(keys, values, log_counts, pooled, n_remove, sink_tokens, window, scores)


snapkv_evict.uses_attention = True
snapkv_evict.observation_window = OBSERVATION_WINDOW
