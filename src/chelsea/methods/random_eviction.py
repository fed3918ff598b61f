"""``random`` eviction: the baseline every method must beat. Seeded, so runs repeat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import setting
from .base import Method, register
from .eviction import evict_lowest


@register
@dataclass(frozen=True)
class RandomEviction(Method):
    """Entries chosen uniformly (per row and head) are evicted."""

    name = "random"
    summary = "uniformly random eviction (the floor)"

    seed: int = setting(0, "seed of the random choice (with the sequence length)", low=0)

    def compress(self, keys, values, log_counts, n_remove, *, sink_tokens, window, scores=None):
        g = torch.Generator(device="cpu").manual_seed(self.seed + keys.shape[2])
        score = torch.rand(log_counts.shape, generator=g).to(keys.device)
        return evict_lowest(keys, values, log_counts, score, n_remove, sink_tokens, window)
