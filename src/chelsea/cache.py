"""A transformers ``Cache`` whose layers keep clustered keys, values and per-entry log-counts.

Life of one layer during ``model.generate``:

1. ``update`` appends the new tokens' keys and values (log-count 0 each) and returns the whole
   stored sequence. The returned key tensor carries a reference to the layer, which is how the
   ``"chelsea"`` attention function (:mod:`chelsea.attention`) finds the log-counts.
2. The attention function marks padding of the new tokens (log-count ``-inf``), attends with the
   log-count bias, then calls ``after_attention``.
3. ``after_attention`` clusters the layer down to its budget right after a prefill (any forward of
   more than one token) and, while decoding, once ``compress_every`` tokens have arrived since the
   last clustering.

``get_seq_length`` keeps returning the number of tokens seen (padding included, like
``DynamicCache``), not the number stored, so positions and RoPE stay right.

For CUDA graphs (:mod:`chelsea.decoding`) a :class:`ClusteredLayer` can be *pinned*: its buffers
stop moving, a decoding step writes its token at a slot index held on the device and attends over
the whole buffer (entries past the filled part carry log-count ``-inf``), and the Python-side
bookkeeping (``advance``) runs outside the captured step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import weighted_attention
from .config import ClusterGenConfig, CompressionConfig
from .errors import ChelseaError
from .importance import OBSERVATION_WINDOW, Reconstruction
from .kernels import write_slot
from .methods._attention_scores import attention_mass, largest_attention_received
from .methods._budgets import layer_shares, profile_shares
from .methods._eviction import region_bounds
from .methods.chelsea import chunked_soft_matching
from .methods.clustergen import ClusterGenSummary, clustergen_attention, radius_scale

_PAD_FILL = {"_key_buf": 0.0, "_value_buf": 0.0, "_count_buf": float("-inf"), "_score_buf": 0.0}  # a padding slot


def _left_padded(entries: tuple[torch.Tensor, ...], names: tuple[str, ...], pad: int) -> tuple[torch.Tensor, ...]:
    """``entries`` (one tensor per buffer in ``names``) with ``pad`` padding slots before them."""
    if pad == 0:
        return entries
    return tuple(torch.cat([t.new_full((*t.shape[:2], pad, *t.shape[3:]), _PAD_FILL[name]), t], dim=2)
                 for name, t in zip(names, entries))

NOT_CLUSTERED_ATTENTION = (
    "the clustered cache was used by an attention function other than 'chelsea', so its entries cannot be weighted. "
    "Call chelsea.prepare_model(model) (or model.set_attn_implementation('chelsea') after chelsea.register()) "
    "before generating."
)


class _CompressedLayer(CacheLayerMixin):
    """What both layer types share: positions from tokens seen, the append, the attention guard.

    Keys and values live in preallocated buffers ``[batch, kv_heads, capacity, head_dim]`` that grow
    by an eighth when full; ``keys``/``values`` are views of the filled part. Appending writes in place,
    so a decoding step copies one token per layer, not the whole cache.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    _buffers = ("_key_buf", "_value_buf")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.seen = 0
        self.new_tokens = 0
        self.length = 0
        self.has_merged = False
        self.awaiting_attention = False
        self.compressions = 0
        self.slot: torch.Tensor | None = None  # device index of the next write, while pinned
        self.hold = False  # the cache holds clustering back (prefill before a reconstruction pass)
        self.question = False  # the forward's last queries are a question: importance is their largest attention

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
        """Pinned: write the new tokens at the device-side slot, return the whole buffers.

        Nothing here reads a Python-side length, so a CUDA graph can replay it; ``advance`` does
        the bookkeeping afterwards.
        """
        new = key_states.shape[2]
        if new != 1:
            raise ChelseaError(f"a pinned cache layer takes one new token per step, not {new}")
        write_slot(self.slot, key_states, value_states, self._key_buf, self._value_buf, *(getattr(self, n) for n in self._buffers[2:]))
        self.new_tokens = new
        self.awaiting_attention = True
        keys = self._key_buf[:, :]  # a view: the buffer itself must not point back at the layer (a cycle)
        keys._chelsea_layer = self
        return keys, self._value_buf

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor, *extra: torch.Tensor) -> None:
        new = key_states.shape[2]
        self._reserve(self.length + new)
        for name, t in zip(self._buffers, (key_states, value_states, *extra)):
            getattr(self, name)[:, :, self.length : self.length + new] = t
        self.length += new

    def get_seq_length(self) -> int:
        return self.seen

    # Batch rows (beam search, batch selection) ------------------------------------------------

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

    def full_nbytes(self) -> int:
        """Bytes a plain ``DynamicCache`` layer would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        batch, heads = self.keys.shape[:2]
        per_token = (self.keys.shape[3] * self.keys.element_size()) + (self.values.shape[3] * self.values.element_size())
        return batch * heads * self.seen * per_token


class ClusteredLayer(_CompressedLayer):
    """One layer's clustered keys ``[batch, kv_heads, entries, head_dim]``, values and log-counts."""

    _buffers = ("_key_buf", "_value_buf", "_count_buf")

    def __init__(self, config: CompressionConfig, compressor: Callable = chunked_soft_matching):
        super().__init__(config)
        self.compressor = compressor
        self.since_compression = 0
        self.row_since: torch.Tensor | None = None  # tokens since each row's last clustering, once rows were joined
        self.row_padding: torch.Tensor | None = None  # padding tokens seen per row, once any
        self.skipped_compressions = 0
        # Attention-ranked methods (H2O, SnapKV) need the attention each entry has received;
        # importance-ranked ones (kvzip, chelsea) a score per entry from chelsea.importance.
        self.importance = bool(getattr(compressor, "uses_importance", False))
        self.scored = self.importance or bool(getattr(compressor, "uses_attention", False))
        self.observation_window = OBSERVATION_WINDOW if self.importance else getattr(compressor, "observation_window", None)
        self.reconstruction: Reconstruction | None = None  # set during a context-reconstruction forward
        # Importance layers scored inside the forward (no compress_context pass): every forward of
        # several tokens ranks all entries by its last queries, so scores from different blocks
        # never compete. Off once compress_context has scored the whole context.
        self.rescore = True
        self.share = 1.0  # this layer's budget beyond sinks and window, relative to an even split
        if self.scored:
            self._buffers = (*ClusteredLayer._buffers, "_score_buf")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._count_buf = torch.zeros(key_states.shape[:2] + (0,), dtype=torch.float32, device=self.device)
        if self.scored:
            self._score_buf = torch.zeros_like(self._count_buf)

    @property
    def log_counts(self):
        return None if not self.is_initialized else self._count_buf[:, :, : self.length]

    @property
    def scores(self):
        """Attention received (attention-ranked methods) or importance (importance-ranked ones)
        per entry, ``[batch, kv_heads, entries]``; ``None`` for the other methods."""
        return None if not (self.is_initialized and self.scored) else self._score_buf[:, :, : self.length]

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        zeros = key_states.new_zeros(key_states.shape[:3], dtype=torch.float32)
        super()._append(key_states, value_states, *([zeros] * (len(self._buffers) - 2)))
        self.since_compression += key_states.shape[2]
        if self.row_since is not None:
            self.row_since += key_states.shape[2]

    # Called by the attention function -------------------------------------------------------

    def attend(self, query, key, value, new_valid, scale):
        """Attention of the new tokens over the stored entries, then clustering if it is due."""
        if self.pinned:
            return self._attend_pinned(query, key, value, new_valid, scale)
        if new_valid is not None:
            self.mark_padding(new_valid)
        if self.reconstruction is not None:
            self.awaiting_attention = False
            return self.reconstruction.attend(query, key, value, self.attention_log_counts(), scale, self.scores)
        out = weighted_attention(query, key, value, self.attention_log_counts(), scale=scale)
        if self.importance:
            if self.new_tokens > 1:  # the new entries' first score; decoded tokens start at 0
                score = largest_attention_received if self.question else attention_mass
                mass = score(query, key, self.attention_log_counts(), scale=scale, last=self.observation_window)
                if self.rescore:
                    self.scores.copy_(mass)
                else:
                    self.scores[:, :, -self.new_tokens :] = mass[:, :, -self.new_tokens :]
        elif self.scored:
            last = self.observation_window if self.new_tokens > 1 else None
            self.scores.add_(attention_mass(query, key, self.attention_log_counts(), scale=scale, last=last))
        self.after_attention()
        return out

    def _attend_pinned(self, query, key, value, new_valid, scale):
        if new_valid is not None:
            raise ChelseaError("a pinned cache layer decodes without an attention mask; padding is kept from the prefill")
        counts = self._count_buf
        out = weighted_attention(query, key, value, counts, scale=scale)
        if self.scored and not self.importance:
            self._score_buf.add_(attention_mass(query, key, counts, scale=scale))
        self.awaiting_attention = False
        return out

    # Pinned buffers, for CUDA graphs ---------------------------------------------------------

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
            getattr(self, name)[:, :, self.length :] = float("-inf") if name == "_count_buf" else 0.0
        self.slot = slot
        self.slot.fill_(self.length)

    def unpin(self) -> None:
        self.slot = None

    @property
    def capacity(self) -> int:
        return self._key_buf.shape[2]

    def advance(self, new: int = 1) -> None:
        """Pinned: account for the ``new`` tokens a step wrote (the step itself advanced ``slot``).

        Clustering is the caller's: :func:`compress_together` on the due layers, then :meth:`repin`.
        """
        self.length += new
        self.seen += new
        self.since_compression += new
        self.new_tokens = new

    @property
    def compression_due(self) -> bool:
        if self.hold or self.config.ratio == 0:  # ratio 0 keeps every token: nothing is ever removed
            return False
        if self.new_tokens > 1:
            return True
        if self.row_since is not None:  # joined rows keep their own schedule, as if decoded alone
            return bool((self.row_since >= self.config.compress_every).any())
        return self.since_compression >= self.config.compress_every

    def repin(self, before: int) -> None:
        """Pinned, after a clustering shrank the layer from ``before`` entries: hide the freed
        entries and move the write slot back."""
        if self.length != before:
            self._count_buf[:, :, self.length : before] = float("-inf")
            self.slot.fill_(self.length)

    # Rows prefilled apart (micro-batched prefill) --------------------------------------------

    def take_rows(self, part: ClusteredLayer, start: int, batch: int) -> None:
        """Copy the entries of ``part`` (a layer of the same cache kind, prefilled with rows
        ``start:start + rows`` of the same prompts) into those rows of this layer of ``batch`` rows.

        The first call allocates the buffers; a part that stored a different number of entries
        (padded prompts cluster to different lengths) is left-padded, or this layer is, with
        entries of log-count ``-inf``, as a padded batch prefilled at once would be.
        """
        rows = part.keys.shape[0]
        if not self.is_initialized:
            self.dtype, self.device = part.dtype, part.device
            for name in part._buffers:
                buf = getattr(part, name)
                setattr(self, name, buf.new_zeros((batch, *buf.shape[1:])))
            self.seen, self.since_compression, self.new_tokens = part.seen, part.since_compression, part.new_tokens
            self.length = part.length
            self.is_initialized = True
        elif part.seen != self.seen:
            raise ChelseaError(f"rows prefilled apart must see the same number of tokens ({part.seen} vs {self.seen})")
        length = max(self.length, part.length)
        if self.length < length:
            self._left_pad(length - self.length)
        entries = _left_padded(part._entries(), part._buffers, length - part.length)
        for name, t in zip(self._buffers, entries):
            getattr(self, name)[start : start + rows, :, :length] = t
        # Padding slots are not tokens (row_padding counts padding tokens seen), but once any
        # exist the rows are treated as padded: attention reads the log-counts, rows cluster apart.
        if part.row_padding is not None or part.length < length or self.row_padding is not None:
            if self.row_padding is None:
                self.row_padding = torch.zeros(batch, dtype=torch.long, device=self.device)
            self.row_padding[start : start + rows] = 0 if part.row_padding is None else part.row_padding
        self.has_merged |= part.has_merged
        self.rescore &= part.rescore
        self.compressions = max(self.compressions, part.compressions)
        self.skipped_compressions = max(self.skipped_compressions, part.skipped_compressions)

    def _left_pad(self, pad: int) -> None:
        """Put ``pad`` padding entries (log-count ``-inf``) before every row's stored entries."""
        self._reallocate(max(self.capacity, self.length + pad), _left_padded(self._entries(), self._buffers, pad))
        self.length += pad
        if self.row_padding is None:
            self.row_padding = torch.zeros(self._key_buf.shape[0], dtype=torch.long, device=self.device)

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """Give padding among the newest tokens log-count ``-inf``: never attended, never merged."""
        if bool(new_valid.all()):
            return
        tail = self.log_counts[:, :, -new_valid.shape[1] :]
        pad = ~new_valid.to(tail.device)
        tail.masked_fill_(pad[:, None, :], float("-inf"))
        padding = pad.sum(-1)
        self.row_padding = padding if self.row_padding is None else self.row_padding + padding

    @property
    def has_padding(self) -> bool:
        return self.row_padding is not None

    def attention_log_counts(self) -> torch.Tensor | None:
        """The bias for attention, or ``None`` while every stored entry is one real token."""
        return self.log_counts if (self.has_padding or self.has_merged) else None

    def after_attention(self) -> None:
        self.awaiting_attention = False
        if self.compression_due:
            self.compress()

    # Clustering ------------------------------------------------------------------------------

    def budget(self, tokens: int, row: int = 0) -> int:
        """Entries batch row ``row`` keeps after ``tokens`` tokens: the config's budget, its part
        beyond sinks and window scaled by ``share`` (uneven layer budgets; one share per row once
        rows compressed apart were joined, see :meth:`append_rows`)."""
        base = self.config.budget(tokens)
        share = self.share if isinstance(self.share, float) else float(self.share[row])
        if share == 1.0:
            return base
        protected = self.config.sink_tokens + self.config.window
        return min(tokens, protected + math.ceil(max(0, base - protected) * share))

    def tokens_per_row(self) -> list[int]:
        """Real tokens seen by each batch row: tokens seen minus the row's padding.

        Not the sum of counts: eviction methods drop entries together with their counts.
        """
        if self.row_padding is None:
            return [self.seen] * self.keys.shape[0]
        return [self.seen - int(p) for p in self.row_padding.tolist()]

    def compress(self) -> None:
        """Cluster every batch row down to its budget, ``config.budget(tokens seen by the row)``."""
        compress_together([self])

    def _local_start(self, length: int | None = None) -> int:
        """Where a decoding-time clustering of ``length`` entries (default: all stored) starts
        (``config.decode_span``; 0: the whole cache)."""
        span = self.config.decode_span
        if span is None or self.new_tokens > 1 or not getattr(self.compressor, "local_decode", False):
            return 0
        start = (self.length if length is None else length) - self.config.window - span
        return start if start > self.config.sink_tokens else 0

    def _store_from(self, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        """Replace the stored entries from ``start`` on, in place."""
        length = start + tensors[0].shape[2]
        for name, t in zip(self._buffers, tensors):
            getattr(self, name)[:, :, start:length] = t
        self.length = length

    def _run(self, entries: tuple[torch.Tensor, ...], n_remove: int, sinks: int | None = None) -> tuple[torch.Tensor, ...]:
        """Apply the compressor to ``entries`` (one tensor per buffer); returns as many tensors."""
        cfg = self.config
        keys, values, log_counts, *scores = entries
        extra = {"scores": scores[0]} if self.scored else {}
        if self.importance:
            extra.update(self.config.guided_options())
        return self.compressor(
            keys,
            values,
            log_counts,
            n_remove,
            chunk_size=cfg.chunk_size,
            sink_tokens=cfg.sink_tokens if sinks is None else sinks,
            window=cfg.window,
            step_fraction=cfg.step_fraction,
            **extra,
        )

    def _record(self, removed: int) -> None:
        if removed > 0:
            self.compressions += 1
            self.has_merged = True
        else:
            self.skipped_compressions += 1

    def _row_stats(self) -> torch.Tensor:
        """Per batch row, on the layer's device: real entries stored, whether they are contiguous
        (padding only before them, as joins and clusterings leave rows) and padding tokens seen."""
        valid = self.log_counts[:, 0] > float("-inf")  # padding is marked on every head alike
        contiguous = (valid[:, 1:] >= valid[:, :-1]).all(-1) if self.length > 1 else valid.new_ones(valid.shape[0])
        padding = self.row_padding.to(valid.device) if self.row_padding is not None else torch.zeros_like(contiguous, dtype=torch.long)
        return torch.stack([valid.sum(-1), contiguous.long(), padding])

    def _due_rows(self, stats: list[list[int]] | None = None) -> list[tuple[int, torch.Tensor, int, int]]:
        """Padded rows to cluster now, each as (row, indices of its real entries, entries to
        remove, local start as :meth:`_local_start` gives it for the row's real entries).

        ``stats`` is :meth:`_row_stats` read to the host (one read for many layers); joined rows
        (:meth:`append_rows`) are due only when their own schedule says so."""
        stored, contiguous, padding = stats if stats is not None else self._row_stats().tolist()
        tokens = [self.seen - p for p in padding]
        to_remove = [n - self.budget(t, b) for b, (n, t) in enumerate(zip(stored, tokens))]
        if self.row_since is not None:
            due = (self.row_since >= self.config.compress_every) | (self.new_tokens > 1)
            to_remove = [n if d else 0 for n, d in zip(to_remove, due.tolist())]
            self.row_since[due] = 0
        jobs = []
        for b, n_remove in enumerate(to_remove):
            if n_remove > 0:
                if contiguous[b]:  # the row's real entries are its last ``stored`` slots: no search
                    idx = torch.arange(self.length - stored[b], self.length, device=self.device)
                else:
                    idx = (self.log_counts[b, 0] > float("-inf")).nonzero().squeeze(-1)
                jobs.append((b, idx, n_remove, self._local_start(stored[b])))
        return jobs

    def _row(self, b: int, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[b : b + 1].index_select(2, idx) for t in self._entries())

    def _write_row(self, b: int, row: tuple[torch.Tensor, ...]) -> None:
        """Rewrite row ``b`` with ``row`` (no longer than the stored length), right-aligned."""
        for name, t in zip(self._buffers, _left_padded(row, self._buffers, self.length - row[0].shape[2])):
            getattr(self, name)[b : b + 1, :, : self.length] = t

    def _compress_padded(self) -> None:
        """Pinned rows with padding: cluster each due row's real entries alone, then rebuild the
        rows left-padded to one length in the same buffers (unpinned layers batch their rows
        through :func:`compress_together`)."""
        jobs = {b: (idx, n_remove, start) for b, idx, n_remove, start in self._due_rows()}
        if not jobs:
            self._record(0)
            return
        valid = self.log_counts[:, 0] > float("-inf")
        rows, removed = [], 0
        for b in range(self.keys.shape[0]):
            idx = jobs[b][0] if b in jobs else valid[b].nonzero().squeeze(-1)
            row = self._row(b, idx)
            if b in jobs:
                _, n_remove, start = jobs[b]
                out = self._run(tuple(t[:, :, start:] for t in row), n_remove, sinks=0 if start else None)
                row = tuple(torch.cat([t[:, :, :start], o], dim=2) for t, o in zip(row, out))
                removed = max(removed, idx.numel() - row[0].shape[2])
            rows.append(row)
        length = max(r[0].shape[2] for r in rows)
        rows = [_left_padded(r, self._buffers, length - r[0].shape[2]) for r in rows]
        self._store(*(torch.cat([r[i] for r in rows]) for i in range(len(rows[0]))))
        self._record(removed)

    def _drop_leading_padding(self, at_most: int | None = None) -> None:
        """Free the leading entries that are padding in every row (the buffers shrink to fit).

        ``at_most`` bounds how many there can be (the caller knows each row's length); below 64
        nothing is looked at: a few shared padding slots are cheaper to keep than a read back
        from the device and a copy of the whole layer after every clustering."""
        if self.length == 0 or self.keys.shape[0] == 0:
            return
        if at_most is not None and at_most < 64:
            return
        real = (self.log_counts > float("-inf")).any(1).any(0)  # [entries]: some row stores a real entry
        first = int(real.float().argmax()) if bool(real.any()) else self.length
        if first:
            for name in self._buffers:  # one buffer at a time, the old one freed before the next
                old = getattr(self, name)
                buf = old.new_empty((*old.shape[:2], self.length - first + 64, *old.shape[3:]))
                buf[:, :, : self.length - first] = old[:, :, first : self.length]
                del old
                setattr(self, name, buf)
            self.length -= first

    # Cache contract ---------------------------------------------------------------------------

    def reset(self) -> None:
        self.__init__(self.config, self.compressor)

    def _map_extra_rows(self, fn) -> None:
        if self.row_padding is not None:
            self.row_padding = fn(self.row_padding)
        if not isinstance(self.share, float):
            self.share = fn(self.share)
        if self.row_since is not None:
            self.row_since = fn(self.row_since)

    # Rows that come and go (a server's running batch) ----------------------------------------

    def append_rows(self, part: ClusteredLayer) -> None:
        """Add the rows of ``part`` (same method and settings, any tokens seen, any entries) after
        this layer's rows.

        Rows that have seen fewer tokens than the other side count the difference as padding
        tokens (never stored), so every row keeps its own token count, budget and positions
        (:meth:`tokens_per_row`); the shorter side's entries are left-padded with log-count ``-inf``.
        """
        if part.pinned or self.pinned:
            raise ChelseaError("unpin cache layers before joining their rows")
        if not part.is_initialized:
            raise ChelseaError("rows to join must have been prefilled")
        if not self.is_initialized or self.keys.shape[0] == 0:
            state = {name: getattr(part, name) for name in part._buffers}
            self.__dict__.update({k: v for k, v in part.__dict__.items() if k not in state})
            self._reallocate(part.length + 64, part._entries())
            self.share = part.share if isinstance(part.share, float) else part.share.clone()
            if part.row_padding is not None:
                self.row_padding = part.row_padding.clone()
            rows = part.keys.shape[0]
            self.row_since = part.row_since.clone() if part.row_since is not None else torch.full((rows,), part.since_compression)
            return
        seen = max(self.seen, part.seen)
        length = max(self.length, part.length)
        ours, theirs = self.keys.shape[0], part.keys.shape[0]
        for name in self._buffers:  # one buffer at a time: the old one is freed before the next is made
            mine, other = getattr(self, name)[:, :, : self.length], getattr(part, name)[:, :, : part.length]
            buf = mine.new_full((ours + theirs, *mine.shape[1:2], length + 64, *mine.shape[3:]), _PAD_FILL[name])
            buf[:ours, :, length - self.length : length] = mine
            buf[ours:, :, length - part.length : length] = other
            del mine
            setattr(self, name, buf)
        padding = [self.row_padding if self.row_padding is not None else torch.zeros(ours, dtype=torch.long, device=self.device),
                   part.row_padding.to(self.device) if part.row_padding is not None else torch.zeros(theirs, dtype=torch.long, device=self.device)]
        self.row_padding = torch.cat([padding[0] + (seen - self.seen), padding[1] + (seen - part.seen)])
        shares = [torch.full((n,), s, dtype=torch.float64) if isinstance(s, float) else s.cpu() for n, s in
                  ((ours, self.share), (theirs, part.share))]
        self.share = torch.cat(shares)
        self.row_since = torch.cat([r if r is not None else torch.full((n,), since) for r, n, since in
                                    ((self.row_since, ours, self.since_compression), (part.row_since, theirs, part.since_compression))])
        self.seen, self.length = seen, length
        self.has_merged |= part.has_merged
        self.rescore &= part.rescore
        self.compressions = max(self.compressions, part.compressions)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only batch rows ``rows`` (in that order), then drop what no remaining row needs:
        leading entries that are padding in every row, and padding tokens every row counts."""
        index = torch.tensor(rows, dtype=torch.long)
        self._map_rows(lambda t: t.index_select(0, index.to(t.device)))
        if not rows or self.row_padding is None:
            return
        common = int(self.row_padding.min())
        self.row_padding -= common
        self.seen -= common
        self._drop_leading_padding()

    # Accounting -----------------------------------------------------------------------------

    def stored_entries(self) -> torch.Tensor:
        """Real (non-padding) entries stored per batch row and KV head, ``[batch, kv_heads]``."""
        return (self.log_counts > float("-inf")).sum(-1)

    def nbytes(self) -> int:
        """Bytes of the stored entries: keys, values, log-counts and, for the attention-ranked
        methods, their scores (padding slots included).

        The buffers' spare room (at most an eighth of the entries after growth, or 64) is not counted here;
        ``reserved_nbytes`` gives it.
        """
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self._entries())

    def reserved_nbytes(self) -> int:
        """Bytes allocated for this layer's buffers, spare room included."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._buffers)


GROUP_ENTRIES = 1 << 21  # (row, head, entry) triples clustered in one batch: bounds the similarity blocks' memory


def compress_together(layers: list[ClusteredLayer]) -> None:
    """Cluster each layer down to its budget (:meth:`ClusteredLayer.compress` is this on one layer).

    Decoding-time clusterings of the same shape (same span of recent entries and, unless the
    compressor takes a number per row, entries to remove: the layers of one model usually agree)
    run as one batch through the compressor, one set of kernel launches instead of one per layer;
    ``chelsea``'s layers, whose uneven budgets remove different numbers, batch too
    (``rowwise_remove``), after a prefill as well (all layers then hold the same entries), up to
    :data:`GROUP_ENTRIES` entries per batch; other whole-cache clusterings run one layer at a
    time. Every (row, head) is clustered on its own, so the results equal clustering layer by
    layer.
    """
    groups: dict[tuple, list[tuple[ClusteredLayer, int, int]]] = {}
    row_groups: dict[tuple, list[tuple]] = {}
    removed: dict[ClusteredLayer, int] = {}
    for layer in layers:
        layer.since_compression = 0
        if layer.row_since is not None and not layer.has_padding:
            layer.row_since.zero_()
        if layer.length == 0:
            continue
        if layer.has_padding and layer.pinned:
            layer._compress_padded()
            continue
        if layer.has_padding:
            removed[layer] = 0
            continue
        n_remove = layer.length - layer.budget(layer.seen)
        if n_remove <= 0:
            layer.skipped_compressions += 1
            continue
        start = layer._local_start()
        rowwise = getattr(layer.compressor, "rowwise_remove", False)
        if start or rowwise:
            shape = (*layer.keys.shape[:2], *layer.keys.shape[3:], layer.keys.dtype)
            key = (layer.length - start, start > 0, None if rowwise else n_remove, shape, layer.config, layer.compressor)
        else:
            key = (id(layer),)
        groups.setdefault(key, []).append((layer, start, n_remove))
    batches = []
    for group in groups.values():
        (layer, start, _), keys = group[0], group[0][0].keys
        per = max(1, GROUP_ENTRIES // (keys.shape[0] * keys.shape[1] * (layer.length - start)))
        batches += [group[i : i + per] for i in range(0, len(group), per)]
    for group in batches:
        first, local = group[0][0], group[0][1] > 0
        rows = first.keys.shape[0]
        parts = [[getattr(layer, name)[:, :, start : layer.length] for layer, start, _ in group] for name in first._buffers]
        removes = [n for _, _, n in group]
        amount = removes[0] if len(set(removes)) == 1 else [n for n in removes for _ in range(rows)]
        out = first._run(tuple(p[0] if len(p) == 1 else torch.cat(p) for p in parts), amount, sinks=0 if local else None)
        for i, (layer, start, n_remove) in enumerate(group):
            before = layer.length
            mine = tuple(t[i * rows : (i + 1) * rows] for t in out)
            if not isinstance(amount, int):  # a row that removed more than the group's fewest holds padding after its entries
                span = layer.length - start
                lo, hi = region_bounds(span, 0 if local else layer.config.sink_tokens, layer.config.window)
                mine = tuple(t[:, :, : span - min(n_remove, hi - lo)] for t in mine)
            if start:
                layer._store_from(start, mine)
            else:
                layer._store(*mine)
            layer._record(before - layer.length)
    # Padded rows (a padded prefill, a server's joined requests): the due rows of every layer
    # that have as many entries to cluster and to remove go through the compressor together.
    # Their rows' statistics are read to the host in one transfer for all layers.
    padded = list(removed)
    if padded:
        stats = torch.cat([layer._row_stats().cpu() for layer in padded], dim=1).tolist()
        offset = 0
        for layer in padded:
            rows = layer.keys.shape[0]
            apart = id(layer) if layer.new_tokens > 1 else None  # a prefill's clusterings are large: layer by layer
            for b, idx, n_remove, start in layer._due_rows([r[offset : offset + rows] for r in stats]):
                row_groups.setdefault((idx.numel() - start, n_remove, start > 0, apart), []).append((layer, b, idx, start))
            offset += rows
    lengths: dict[ClusteredLayer, list[int]] = {layer: [] for layer in padded}
    for (_, n_remove, local, _), items in row_groups.items():
        parts = [layer._row(b, idx[start:]) for layer, b, idx, start in items]
        out = items[0][0]._run(tuple(torch.cat(p) for p in zip(*parts)), n_remove, sinks=0 if local else None)
        for i, (layer, b, idx, start) in enumerate(items):
            row = tuple(t[i : i + 1] for t in out)
            if start:  # the entries before the re-clustered span, read once, ahead of the rewrite
                row = tuple(torch.cat([t, r], dim=2) for t, r in zip(layer._row(b, idx[:start]), row))
            layer._write_row(b, row)
            removed[layer] = max(removed[layer], idx.numel() - row[0].shape[2])
            lengths[layer].append(row[0].shape[2])
    for layer, count in removed.items():
        if count:
            # every row still holds at least its clustered length, so the shared padding in front
            # is at most the layer's length minus the longest row clustered now
            layer._drop_leading_padding(at_most=layer.length - max(lengths[layer]))
        layer._record(count)


class ClusterGenLayer(_CompressedLayer):
    """One layer for ClusterGen: sinks and a recent window kept exactly, older tokens summarised.

    ``keys``/``values`` hold the exact entries (sinks, then the most recent tokens); tokens that
    leave the window go into a :class:`ClusterGenSummary` in one bulk update. Beam search and
    batch selection move the summary's rows with the exact entries. Padded batches are refused for
    now (each row would need its own window).
    """

    def __init__(self, config: ClusterGenConfig):
        super().__init__(config)
        self.summary: ClusterGenSummary | None = None

    def attend(self, query, key, value, new_valid, scale):
        if new_valid is not None and not bool(new_valid.all()):
            raise ChelseaError("clustergen does not support padded batches yet: run prompts of different lengths one by one")
        out = clustergen_attention(query, self.summary, key, value, scale=scale)
        self.awaiting_attention = False
        overflow = self.keys.shape[2] - self.config.sink_tokens - self.config.window
        if overflow > 0 and (self.new_tokens > 1 or overflow >= self.config.compress_every):
            self.summarise(overflow)
        return out

    def summarise(self, count: int) -> None:
        """Move ``count`` tokens just after the sinks into the summary."""
        sinks = self.config.sink_tokens
        old_k, old_v = self.keys[:, :, sinks : sinks + count], self.values[:, :, sinks : sinks + count]
        if self.summary is None:
            scale = radius_scale(old_k, self.config.radius)
            batch, heads, _, dim = old_k.shape
            self.summary = ClusterGenSummary.empty(
                batch, heads, dim, old_v.shape[-1], delta=self.config.delta * scale,
                cluster_samples=self.config.cluster_samples, value_samples=self.config.value_samples,
                numerator=self.config.numerator,
                dtype=old_k.dtype, device=old_k.device,
            )
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

    def reset(self) -> None:
        self.__init__(self.config)

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


class ClusteredCache(Cache):
    """KV cache compressed by clustering; pass it as ``past_key_values``.

    A :class:`CompressionConfig` (or its keyword settings) selects Chelsea's chunked soft matching;
    a :class:`ClusterGenConfig` selects ClusterGen's summary.

    Example::

        cache = ClusteredCache(ratio=0.8)          # keep 20% of the KV entries
        model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
        cache.stats()

    The model must use the ``"chelsea"`` attention (see :func:`chelsea.prepare_model`).
    """

    def __init__(
        self,
        config: CompressionConfig | ClusterGenConfig | None = None,
        *,
        compressor: Callable = chunked_soft_matching,
        **knobs,
    ):
        if config is not None and knobs:
            raise ChelseaError(f"pass either a config or keyword settings, not both (got {sorted(knobs)})")
        self.config = config if config is not None else CompressionConfig(**knobs)
        self.compressor = compressor
        self._hold = False
        self._question = False
        if isinstance(self.config, ClusterGenConfig):
            layer = partial(ClusterGenLayer, self.config)
        else:
            layer = partial(ClusteredLayer, self.config, compressor)
        super().__init__(layer_class_to_replicate=layer)

    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``Cache.update``, kept out of ``torch.compile`` graphs: the layers keep Python-side
        counters and cluster on the host, which a traced graph would freeze."""
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.layers[layer_idx].hold = self._hold
        self.layers[layer_idx].question = self._question
        return out

    @property
    def scores_importance(self) -> bool:
        """Whether the method ranks entries by importance scores (``kvzip``, ``chelsea``)."""
        return bool(getattr(self.compressor, "uses_importance", False)) and not isinstance(self.config, ClusterGenConfig)

    @contextmanager
    def held(self, question: bool = False) -> Iterator[None]:
        """Hold clustering back (a prefill to be scored first); :meth:`compress_all` then compresses.

        ``question``: the prompt ends with the question, so importance-ranked layers score the new
        entries by the largest attention the last queries give them (a probability, comparable
        with the reconstruction scores) instead of its sum."""
        self._hold, self._question = True, question
        for layer in self.layers:
            layer.hold, layer.question = True, question
        try:
            yield
        finally:
            self._hold = self._question = False
            for layer in self.layers:
                layer.hold = layer.question = False

    def compress_due(self) -> None:
        """Cluster the layers whose clustering is due, all together (after a decoding step run
        under :meth:`held`: one batch of clusterings instead of one per layer, same results,
        since a layer's entries are not read again in the step that made them due)."""
        due = [layer for layer in self.layers if isinstance(layer, ClusteredLayer) and layer.is_initialized
               and layer.compression_due]
        if due:
            compress_together(due)

    def compress_all(self, rerank=None, even: frozenset[int] = frozenset(), profile: torch.Tensor | None = None) -> None:
        """Compress every layer to its budget now. Importance-ranked methods first split the budget
        unevenly over layers by their scores (:func:`chelsea.methods._budgets.layer_shares`);
        the layers whose indices are in ``even`` (scored otherwise than the rest, so not
        comparable) keep an even share and the others split theirs. ``profile`` ``[layers,
        points]`` (the held layers' calibrated score quantiles) splits it by those instead, over
        every layer (:func:`chelsea.methods._budgets.profile_shares`). ``rerank(layers)``, when
        given, may then rewrite the layers' scores (``chelsea``'s fact heads), so the budgets stay
        the ones the scores asked for."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers or isinstance(self.config, ClusterGenConfig):
            return
        if self.scores_importance and len(layers) > 1 and not any(layer.has_padding for layer in layers):
            cfg = self.config
            seen = layers[0].seen
            keep = cfg.budget(seen) - cfg.sink_tokens - cfg.window
            if keep > 0 and all(layer.length == seen for layer in layers):
                if profile is not None and len(profile) == len(layers):
                    ranked, shares = layers, profile_shares(profile, keep, seen - cfg.sink_tokens - cfg.window, cfg.layer_floor)
                else:
                    ranked = [layer for i, layer in enumerate(self.layers) if layer.is_initialized and i not in even]
                    regions = [layer.scores[:, :, cfg.sink_tokens : layer.length - cfg.window] for layer in ranked]
                    shares = layer_shares(regions, keep, cfg.layer_floor)
                for layer, share in zip(ranked, shares):
                    layer.share = share / keep
        if rerank is not None:
            rerank(layers)
        compress_together(layers)

    def empty_like(self) -> ClusteredCache:
        """A new empty cache with the same settings and method."""
        return ClusteredCache(self.config, compressor=self.compressor)

    def holding(self, entries: list[tuple[torch.Tensor, torch.Tensor] | None], room: int = 0) -> ClusteredCache:
        """A new cache of the same settings and method whose layer ``i`` holds ``entries[i]``
        (``keys, values`` ``[batch, kv_heads, n, head_dim]``, every entry one real token), as an
        unclustered prefill leaves it; ``None`` leaves a layer empty. ``room``: entries each
        layer's buffers have space for beyond those, so a forward of that many tokens appends
        without copying the buffers again. The context-reconstruction repeats run on such
        caches, several chunks of a context side by side as batch rows."""
        if isinstance(self.config, ClusterGenConfig):
            raise ChelseaError("clustergen caches do not take stored entries")
        cache = self.empty_like()
        for pair in entries:
            layer = cache.layer_class_to_replicate()
            if pair is not None:
                keys, values = pair
                layer.lazy_initialization(keys, values)
                layer._reserve(keys.shape[2] + room)
                layer._append(keys, values)
                layer.seen = layer.since_compression = keys.shape[2]
            cache.layers.append(layer)
        return cache

    def take_rows(self, part: ClusteredCache, start: int, batch: int) -> None:
        """Copy ``part`` (prefilled with rows ``start:`` of the prompts) into those rows of this
        cache of ``batch`` rows; see :func:`chelsea.generation.prefill`."""
        if isinstance(self.config, ClusterGenConfig):
            raise ChelseaError("clustergen caches cannot be prefilled in micro-batches yet; prefill the whole batch at once")
        while len(self.layers) < len(part.layers):
            self.layers.append(self.layer_class_to_replicate())
        for layer, piece in zip(self.layers, part.layers):
            layer.take_rows(piece, start, batch)

    def append_rows(self, part: ClusteredCache) -> None:
        """Add the rows of ``part`` (a cache of the same method and settings, prefilled and
        compressed on its own) after this cache's rows; see :meth:`ClusteredLayer.append_rows`."""
        if isinstance(self.config, ClusterGenConfig) or self.config != part.config or self.compressor is not part.compressor:
            raise ChelseaError("only caches of the same clustering method and settings can share a batch")
        while len(self.layers) < len(part.layers):
            self.layers.append(self.layer_class_to_replicate())
        for layer, piece in zip(self.layers, part.layers):
            layer.append_rows(piece)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only batch rows ``rows`` and free what the others alone needed."""
        for layer in self.layers:
            layer.keep_rows(rows)

    @property
    def batch_size(self) -> int:
        first = next((layer for layer in self.layers if layer.is_initialized), None)
        return 0 if first is None else first.keys.shape[0]

    def row_positions(self) -> list[int]:
        """Tokens seen by each batch row, padding not counted: the position of its next token."""
        first = next((layer for layer in self.layers if layer.is_initialized), None)
        return [] if first is None else first.tokens_per_row()

    def nbytes(self) -> int:
        """Bytes the cache's layers hold now (:meth:`ClusteredLayer.nbytes`: padding slots included)."""
        return sum(layer.nbytes() for layer in self.layers if layer.is_initialized)

    def stats(self) -> dict:
        """What the cache holds now, averaged over layers (entries also over rows and KV heads)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return {"tokens_seen": 0, "kv_entries": 0.0, "kv_bytes": 0, "kv_bytes_full": 0, "compressed": False}
        entries = torch.stack([layer.stored_entries().float().mean() for layer in layers]).mean().item()
        return {
            "tokens_seen": layers[0].seen,
            "kv_entries": round(entries, 2),
            "kv_bytes": self.nbytes(),
            "kv_bytes_full": sum(layer.full_nbytes() for layer in layers),
            "compressed": any(layer.has_merged for layer in layers),
            "clusterings": sum(layer.compressions for layer in layers),
        }
