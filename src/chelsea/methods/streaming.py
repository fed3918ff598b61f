"""StreamingLLM (Xiao et al., 2023): keep the attention sinks and the most recent tokens, evict the oldest."""

from __future__ import annotations

import torch

from ._eviction import evict_lowest


def streaming_evict(keys, values, log_counts, n_remove: int, *, sink_tokens: int = 4, window: int = 64, **_):
    """Evict the ``n_remove`` oldest entries after the sinks. Same signature as the other methods."""
    age = torch.arange(keys.shape[2], device=keys.device, dtype=torch.float32).expand(log_counts.shape)
    return evict_lowest(keys, values, log_counts, age, n_remove, sink_tokens, window)
