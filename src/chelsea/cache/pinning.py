"""Pinned layers, for decoding steps replayed from a CUDA graph (:mod:`chelsea.runtime.decoding`).

A pinned layer's buffers stop moving: a decoding step writes its token at a slot index held on
the device and attends over the whole buffer (entries past the filled part carry log-count
``-inf``), and the Python-side bookkeeping (:meth:`Pinning.advance`) runs outside the captured
step. Compression runs between replays, in place (:func:`chelsea.cache.compress_together`), then
:meth:`Pinning.repin` hides what it freed.
"""

from __future__ import annotations

import torch

from ..attention import weighted_attention
from ..errors import ChelseaError
from ..kernels import write_slot
from .storage import pad_slots


class Pinning:
    """Mixin of :class:`chelsea.cache.ClusteredLayer`: fixed buffers and a device-side write slot."""

    def pin(self, capacity: int, slot: torch.Tensor) -> None:
        """Fix the buffers at ``capacity`` entries and write new tokens at ``slot`` (a one-element
        device tensor the caller keeps equal to ``length``). Entries past ``length`` get
        log-count ``-inf``, so attending over the whole buffer equals attending over the filled part."""
        if not self.is_initialized:
            raise ChelseaError("pin a cache layer after the prefill, not before")
        if capacity <= self.length:
            raise ChelseaError(f"a pinned layer needs room for new tokens: capacity {capacity} <= {self.length} entries")
        if capacity != self._key_buf.shape[2]:
            self._reallocate(capacity, self._entries())
        # Free entries are read too (with weight 0): they must hold finite numbers, not old memory.
        for name in self._buffers:
            buf = getattr(self, name)
            buf[:, :, self.length :] = pad_slots(name, buf, 1)
        self.slot = slot
        self.slot.fill_(self.length)

    def unpin(self) -> None:
        self.slot = None

    def _write_at_slot(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Pinned: write the new token at the device-side slot, return the whole buffers.

        Nothing here reads a Python-side length, so a CUDA graph can replay it; ``advance`` does
        the bookkeeping afterwards.
        """
        new = key_states.shape[2]
        if new != 1:
            raise ChelseaError(f"a pinned cache layer takes one new token per step, not {new}")
        write_slot(self.slot, key_states, value_states, self._key_buf, self._value_buf,
                   *(t for t in self._statistics(self.capacity) if t is not None))
        self.new_tokens = new
        self.awaiting_attention = True
        keys = self._key_buf[:, :]  # a view: the buffer itself must not point back at the layer (a cycle)
        keys._chelsea_layer = self
        return keys, self._value_buf

    def _attend_pinned(self, query, key, value, new_valid, scale, module=None):
        if new_valid is not None:
            raise ChelseaError("a pinned cache layer decodes without an attention mask; padding is kept from the prefill")
        counts, scores = self._statistics(self.capacity)
        out = weighted_attention(query, key, value, counts, scale=scale)
        if self.observer is not None and self.observer.single_tokens:
            self.observer.observe(self, query, key, value, counts, scale, scores, module)
        self.awaiting_attention = False
        return out

    def advance(self, new: int = 1) -> None:
        """Pinned: account for the ``new`` tokens a step wrote (the step itself advanced ``slot``).

        Compression is the caller's: :func:`chelsea.cache.compress_together` on the due layers,
        then :meth:`repin`.
        """
        self.length += new
        self.seen += new
        self.since_compression += new
        if self.row_since is not None:
            self.row_since = [since + new for since in self.row_since]
        self.new_tokens = new

    def repin(self, before: int) -> None:
        """Pinned, after a compression shrank the layer from ``before`` entries: hide the freed
        entries and move the write slot back."""
        if self.length != before:
            self._statistics(before)[0][:, :, self.length :] = float("-inf")
            self.slot.fill_(self.length)
