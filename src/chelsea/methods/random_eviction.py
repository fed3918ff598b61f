"""Random eviction: the baseline every method must beat. Seeded, so runs repeat."""

from __future__ import annotations

import torch

from ._eviction import evict_lowest


def random_evict(keys, values, log_counts, n_remove: int, *, sink_tokens: int = 4, window: int = 64, seed: int = 0, **_):
    """Evict ``n_remove`` entries chosen uniformly (per row and head) outside sinks and window."""
    g = torch.Generator(device="cpu").manual_seed(seed + keys.shape[2])
    score = torch.rand(log_counts.shape, generator=g).to(keys.device)
    return evict_lowest(keys, values, log_counts, score, n_remove, sink_tokens, window)
