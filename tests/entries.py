"""Random entries of one cache layer for the method tests: ``(keys, values, log_counts, scores)``."""

import torch


def random_entries(batch=2, heads=2, length=120, seed=0, dim=8):
    """Keys and values ``[batch, heads, length, dim]`` from a normal, log-counts 0 (one token each),
    scores uniform in [0, 1), all from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, dim, generator=g)
    values = torch.randn(batch, heads, length, dim, generator=g)
    scores = torch.rand(batch, heads, length, generator=g)
    return keys, values, torch.zeros(batch, heads, length), scores
