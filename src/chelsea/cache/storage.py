"""Storage of one cache layer: preallocated buffers written in place, positions from tokens seen.

Keys and values live in buffers ``[batch, kv_heads, capacity, head_dim]`` that grow by an eighth
when full; ``keys``/``values`` are views of the filled part. Appending writes in place, so a
decoding step copies one token per layer, not the whole cache. ``get_seq_length`` returns the
number of tokens seen (padding included, like ``DynamicCache``), not the number stored, so
positions and RoPE stay right after compression.

The keys ``update`` returns carry a reference to their layer, which is how the ``"chelsea"``
attention function (:mod:`chelsea.attention`) finds the layer and lets it attend.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..errors import ChelseaError

PAD_FILL = {"_key_buf": 0.0, "_value_buf": 0.0, "_count_buf": float("-inf")}  # a padding slot

NOT_CLUSTERED_ATTENTION = (
    "the clustered cache was used by an attention function other than 'chelsea', so its entries cannot be weighted. "
    "Call chelsea.prepare_model(model) (or model.set_attn_implementation('chelsea') after chelsea.register()) "
    "before generating."
)


def pad_slots(name: str, like: torch.Tensor, entries: int, rows: int | None = None) -> torch.Tensor:
    """``entries`` padding slots of buffer ``name`` shaped like ``like`` (``rows`` rows, default
    ``like``'s): zero keys and values, log-count ``-inf`` (and score 0, where the count buffer
    holds scores beside the log-counts)."""
    shape = (like.shape[0] if rows is None else rows, like.shape[1], entries, *like.shape[3:])
    out = like.new_full(shape, PAD_FILL[name])
    if name == "_count_buf" and like.dim() == 4:
        out[..., 1:] = 0.0
    return out


_SLOTS: dict = {}  # one padding slot per (buffer, device, dtype, entry shape), for pad_view


def pad_view(name: str, like: torch.Tensor, entries: int) -> torch.Tensor:
    """:func:`pad_slots` as a broadcast view of one stored slot: nothing allocated or filled, for
    reading only (joined by ``cat``, gathered from). A compression rewrites every layer's rows
    with padding in front; a fill per buffer and layer was three kernel launches per layer."""
    key = (name, like.device, like.dtype, tuple(like.shape[3:]))
    slot = _SLOTS.get(key)
    if slot is None:
        slot = _SLOTS[key] = pad_slots(name, like[:1, :1], 1)
    return slot.expand(like.shape[0], like.shape[1], entries, *like.shape[3:])


def left_padded(entries: tuple[torch.Tensor, ...], names: tuple[str, ...], pad: int) -> tuple[torch.Tensor, ...]:
    """``entries`` (one tensor per buffer in ``names``) with ``pad`` padding slots before them."""
    if pad == 0:
        return entries
    return tuple(torch.cat([pad_view(name, t, pad), t], dim=2) for name, t in zip(names, entries))


class LayerStorage(CacheLayerMixin):
    """The buffers of one layer and what every layer type does with them: append, replace, views."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    _buffers = ("_key_buf", "_value_buf")

    def __init__(self, config, method):
        super().__init__()
        self.config, self.method = config, method
        self.seen = 0
        self.new_tokens = 0
        self.length = 0
        self.has_merged = False
        self.awaiting_attention = False
        self.compressions = 0
        self.slot: torch.Tensor | None = None  # device index of the next write, while pinned
        self.hold = False  # the cache holds compression back (a prefill to be scored first)
        self.question = False  # the forward's last queries are a question (scores: their largest attention)

    @property
    def pinned(self) -> bool:
        return self.slot is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._key_buf, self._value_buf = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    @property
    def keys(self):
        return None if not self.is_initialized else self._key_buf[:, :, : self.length]

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ assigns None
        if value is not None:
            raise AttributeError("write stored entries with _store(), not by assigning keys")

    @property
    def values(self):
        return None if not self.is_initialized else self._value_buf[:, :, : self.length]

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("write stored entries with _store(), not by assigning values")

    @property
    def capacity(self) -> int:
        return self._key_buf.shape[2]

    def _reallocate(self, capacity: int, entries: tuple[torch.Tensor, ...]) -> None:
        """New buffers of ``capacity`` entries, starting with ``entries`` (one tensor per buffer)."""
        for name, t in zip(self._buffers, entries):
            buf = t.new_empty((*t.shape[:2], capacity, *t.shape[3:]))
            buf[:, :, : t.shape[2]] = t
            setattr(self, name, buf)

    def _reserve(self, needed: int) -> None:
        """Make every buffer hold at least ``needed`` entries, keeping the filled part. Growth is by
        an eighth (at least 64 entries): a long batch that decodes a few tokens must not claim half
        its size again."""
        capacity = self._key_buf.shape[2]
        if needed > capacity:
            self._reallocate(max(needed, capacity + max(capacity // 8, 64)), self._entries())

    def _entries(self) -> tuple[torch.Tensor, ...]:
        """The filled part of every buffer: keys, values (and log-counts, scores where kept)."""
        return tuple(getattr(self, name)[:, :, : self.length] for name in self._buffers)

    def _store(self, *tensors: torch.Tensor) -> None:
        """Replace the stored entries (one tensor per buffer, same length).

        In place, unless the entries fill less than half the buffers (after clustering a prefill):
        then the buffers are reallocated with a quarter of room to grow, so the memory is returned.
        """
        length = tensors[0].shape[2]
        if self.pinned and length > self._key_buf.shape[2]:
            raise ChelseaError(f"a pinned cache layer holds {self._key_buf.shape[2]} entries; {length} do not fit")
        if not self.pinned and self._key_buf.shape[2] > 2 * length + 64:
            self._reallocate(length + max(64, length // 4), tensors)
        else:
            self._reserve(length)
            for name, t in zip(self._buffers, tensors):
                getattr(self, name)[:, :, :length] = t
        self.length = length

    def _store_from(self, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        """Replace the stored entries from ``start`` on, in place."""
        length = start + tensors[0].shape[2]
        for name, t in zip(self._buffers, tensors):
            getattr(self, name)[:, :, start:length] = t
        self.length = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens and return every stored entry; the keys carry this layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.awaiting_attention:
            raise ChelseaError(NOT_CLUSTERED_ATTENTION)
        if self.pinned:
            return self._write_at_slot(key_states, value_states)
        self._append(key_states, value_states)
        self.new_tokens = key_states.shape[2]
        self.seen += self.new_tokens
        self.awaiting_attention = True
        keys = self.keys
        keys._chelsea_layer = self
        return keys, self.values

    def _write_at_slot(self, key_states: torch.Tensor, value_states: torch.Tensor):
        raise ChelseaError(f"{type(self).__name__} cannot be pinned")

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor, *extra: torch.Tensor) -> None:
        new = key_states.shape[2]
        self._reserve(self.length + new)
        for name, t in zip(self._buffers, (key_states, value_states, *extra)):
            getattr(self, name)[:, :, self.length : self.length + new] = t
        self.length += new

    def get_seq_length(self) -> int:
        return self.seen

    def _map_rows(self, fn) -> None:
        """Apply ``fn`` to every per-row tensor (buffers first, then what a subclass keeps)."""
        if self.is_initialized:
            for name in self._buffers:
                setattr(self, name, fn(getattr(self, name)))
            self._map_extra_rows(fn)

    def _map_extra_rows(self, fn) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2] + query_length if self.is_initialized else query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.config, self.method)

    def full_nbytes(self) -> int:
        """Bytes a plain ``DynamicCache`` layer would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        batch, heads = self.keys.shape[:2]
        per_token = (self.keys.shape[3] * self.keys.element_size()) + (self.values.shape[3] * self.values.element_size())
        return batch * heads * self.seen * per_token
