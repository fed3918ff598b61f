"""The cache layer of ``clustergen``: sinks and a recent window exact, older tokens summarised.

The summary and the attention estimated from it are the method's (:class:`chelsea.methods.ClusterGen`);
this layer only decides what is exact and when tokens move into the summary.
"""

from __future__ import annotations

import torch

from ..errors import ChelseaError
from .storage import LayerStorage


class ClusterGenLayer(LayerStorage):
    """``keys``/``values`` hold the exact entries (sinks, then the most recent tokens); tokens that
    leave the window go into the method's summary in one bulk update. Beam search and batch
    selection move the summary's rows with the exact entries. Padded batches are refused for now
    (each row would need its own window)."""

    def __init__(self, config, method):
        super().__init__(config, method)
        self.every = config.compress_every or method.compress_every
        self.summary = None

    def attend(self, query, key, value, new_valid, scale, module=None):
        if new_valid is not None and not bool(new_valid.all()):
            raise ChelseaError("clustergen does not support padded batches yet: run prompts of different lengths one by one")
        out = self.method.attention(query, self.summary, key, value, scale)
        self.awaiting_attention = False
        overflow = self.keys.shape[2] - self.config.sink_tokens - self.config.window
        if overflow > 0 and (self.new_tokens > 1 or overflow >= self.every):
            self.summarise(overflow)
        return out

    def summarise(self, count: int) -> None:
        """Move ``count`` tokens just after the sinks into the summary."""
        sinks = self.config.sink_tokens
        old_k, old_v = self.keys[:, :, sinks : sinks + count], self.values[:, :, sinks : sinks + count]
        if self.summary is None:
            self.summary = self.method.new_summary(old_k, old_v)
        self.summary.update(old_k, old_v)
        self._store(
            torch.cat([self.keys[:, :, :sinks], self.keys[:, :, sinks + count :]], dim=2),
            torch.cat([self.values[:, :, :sinks], self.values[:, :, sinks + count :]], dim=2),
        )
        self.has_merged = True
        self.compressions += 1

    def _map_extra_rows(self, fn) -> None:
        if self.summary is not None:
            self.summary.map_rows(fn)

    def stored_entries(self) -> torch.Tensor:
        """Token-equivalent entries per row and head: bytes held / bytes of one token's key and value."""
        batch, heads = self.keys.shape[:2]
        per_token = self.keys.shape[3] * self.keys.element_size() + self.values.shape[3] * self.values.element_size()
        return torch.full((batch, heads), self.nbytes() / (batch * heads * per_token))

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        exact = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return exact + (self.summary.nbytes() if self.summary is not None else 0)
