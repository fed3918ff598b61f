"""``ClusteredCache``: a transformers ``Cache`` whose layers hold compressed keys and values.

One cache, one method (:mod:`chelsea.methods`), one shared :class:`~chelsea.settings.CompressionConfig`.
The method's ``layer`` names the layer type (:data:`LAYER_TYPES`); layers are made lazily, one
per model layer, as transformers' ``Cache`` does. Scoring, when the method ranks by scores,
reaches the layers through their observers (:mod:`chelsea.cache.observer`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from transformers.cache_utils import Cache

from ..errors import ChelseaError
from ..methods import Method, get_method
from ..settings import CompressionConfig
from .clustergen_layer import ClusterGenLayer
from .compress import compress_together
from .layer import ClusteredLayer

LAYER_TYPES = {"clustered": ClusteredLayer, "clustergen": ClusterGenLayer}
SHARED = frozenset(CompressionConfig.__dataclass_fields__)


class ClusteredCache(Cache):
    """KV cache compressed by a method; pass it to ``model.generate`` as the cache.

    Example::

        cache = ClusteredCache(ratio=0.8)                                  # chelsea, keep 20%
        cache = ClusteredCache(method="chelsea-paper", ratio=0.8, chunk_size=16)
        model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
        cache.stats()

    ``settings`` are the shared ones (``ratio``, ``sink_tokens``, ``window``, ``compress_every``)
    and the method's own, by name; or pass a :class:`CompressionConfig` and a :class:`Method`.
    The model must use the ``"chelsea"`` attention (see :func:`chelsea.prepare_model`).
    """

    def __init__(self, config: CompressionConfig | None = None, *, method: str | Method = "chelsea", **settings):
        shared = {k: v for k, v in settings.items() if k in SHARED}
        if config is not None and shared:
            raise ChelseaError(f"pass either a config or the shared settings, not both (got {sorted(shared)})")
        self.config = config if config is not None else CompressionConfig(**shared)
        self.method = get_method(method, **{k: v for k, v in settings.items() if k not in SHARED})
        if self.method.layer not in LAYER_TYPES:
            raise ChelseaError(f"{self.method.name} asks for a cache layer of type {self.method.layer!r}; known: {', '.join(LAYER_TYPES)}")
        self._hold = False
        self._question = False
        super().__init__(layer_class_to_replicate=partial(LAYER_TYPES[self.method.layer], self.config, self.method))

    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``Cache.update``, kept out of ``torch.compile`` graphs: the layers keep Python-side
        counters and compress on the host, which a traced graph would freeze."""
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.layers[layer_idx].hold = self._hold
        self.layers[layer_idx].question = self._question
        return out

    @contextmanager
    def held(self, question: bool = False) -> Iterator[None]:
        """Hold compression back (a prefill to be scored first); :meth:`compress_all` then compresses.

        ``question``: the prompt ends with the question, so the layers' observers may score the
        new entries by what the last queries read (see :mod:`chelsea.scoring`)."""
        self._hold, self._question = True, question
        for layer in self.layers:
            layer.hold, layer.question = True, question
        try:
            yield
        finally:
            self._hold = self._question = False
            for layer in self.layers:
                layer.hold = layer.question = False

    def _clustered(self) -> list[ClusteredLayer]:
        return [layer for layer in self.layers if isinstance(layer, ClusteredLayer) and layer.is_initialized]

    def compress_due(self) -> None:
        """Compress the layers whose compression is due, all together (after a decoding step run
        under :meth:`held`: one batch of compressions instead of one per layer, same results,
        since a layer's entries are not read again in the step that made them due). Pinned
        layers (a step replayed from a CUDA graph) compress in place and then hide what they freed
        (:meth:`ClusteredLayer.repin`)."""
        due = [(layer, layer.length) for layer in self._clustered() if layer.compression_due]
        if due:
            compress_together([layer for layer, _ in due])
            for layer, before in due:
                if layer.pinned:
                    layer.repin(before)

    def compress_all(self) -> None:
        """Compress every layer to its budget now (each layer's ``share`` of the budget beyond
        sinks and window, which scoring may have made uneven)."""
        layers = self._clustered()
        if layers:
            compress_together(layers)

    def empty_like(self) -> ClusteredCache:
        """A new empty cache with the same settings and method."""
        return ClusteredCache(self.config, method=self.method)

    def _rows_supported(self, what: str) -> None:
        if LAYER_TYPES[self.method.layer] is not ClusteredLayer:
            raise ChelseaError(f"{self.method.name} caches {what} yet")

    def holding(self, entries: list[tuple[torch.Tensor, torch.Tensor] | None], room: int = 0) -> ClusteredCache:
        """A new cache of the same settings and method whose layer ``i`` holds ``entries[i]``
        (``keys, values`` ``[batch, kv_heads, n, head_dim]``, every entry one real token), as an
        uncompressed prefill leaves it; ``None`` leaves a layer empty. ``room``: entries each
        layer's buffers have space for beyond those, so a forward of that many tokens appends
        without copying the buffers again."""
        self._rows_supported("do not take stored entries")
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
        cache of ``batch`` rows; see :func:`chelsea.runtime.generation.prefill`."""
        self._rows_supported("cannot be prefilled in micro-batches; prefill the whole batch at once")
        while len(self.layers) < len(part.layers):
            self.layers.append(self.layer_class_to_replicate())
        for layer, piece in zip(self.layers, part.layers):
            layer.take_rows(piece, start, batch)

    def append_rows(self, part: ClusteredCache) -> None:
        """Add the rows of ``part`` (a cache of the same method and settings, prefilled and
        compressed on its own) after this cache's rows; see :meth:`ClusteredLayer.append_rows`."""
        self._rows_supported("cannot share a batch")
        if self.config != part.config or self.method != part.method:
            raise ChelseaError("only caches of the same method and settings can share a batch")
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
