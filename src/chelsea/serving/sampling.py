"""Choosing each row's next token: the argmax, or a seeded draw after penalties, temperature and top-p.

Draws are made on the CPU with a generator per request, so the same seed gives the same tokens on
any device and whatever else runs in the batch. Greedy rows of a batch take one argmax together.
"""

from __future__ import annotations

import secrets

import torch

from .protocol import Sampling


class RowSampler:
    """The token choice of one request, with its own generator and counts of what it generated."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        self.counts: dict[int, int] = {}

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from one row's logits ``[vocab]``."""
        s = self.sampling
        x = logits.float().cpu()
        if self.counts and (s.presence_penalty or s.frequency_penalty):
            ids = torch.tensor(list(self.counts))
            seen = torch.tensor(list(self.counts.values()), dtype=torch.float32)
            x[ids] -= s.presence_penalty + s.frequency_penalty * seen
        if s.argmax:
            token = int(x.argmax())
        else:
            probs = torch.softmax((x - x.max()) / s.temperature, dim=-1)
            if s.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(0) - ordered > s.top_p  # tokens past the nucleus (the first always stays)
                probs = torch.zeros_like(probs).scatter_(0, order, ordered.masked_fill(outside, 0.0))
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """One token per row of ``logits`` ``[rows, vocab]``: greedy rows by one batched argmax."""
    tokens = logits.argmax(-1).tolist()
    for i, sampler in enumerate(samplers):
        if not sampler.sampling.greedy:
            tokens[i] = sampler.choose(logits[i])
    return tokens
