"""``streaming``, StreamingLLM (Xiao et al., 2023): keep the attention sinks and the most recent tokens, evict the oldest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, register
from .eviction import evict_lowest


@register
@dataclass(frozen=True)
class Streaming(Method):
    """Sinks and a recent window; the oldest entries go first."""

    name = "streaming"
    summary = "attention sinks and the most recent tokens, the oldest evicted (StreamingLLM)"
    paper = "StreamingLLM, arXiv 2309.17453"

    def compress(self, keys, values, log_counts, n_remove, *, sink_tokens, window, scores=None):
        age = torch.arange(keys.shape[2], device=keys.device, dtype=torch.float32).expand(log_counts.shape)
        return evict_lowest(keys, values, log_counts, age, n_remove, sink_tokens, window)
