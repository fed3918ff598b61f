"""Compressing layers: each down to its budget, many layers as one batch where they agree.

Every (row, KV head) is compressed on its own, so batching layers (or rows) together gives the
same entries as compressing them one by one; it only saves kernel launches.
"""

from __future__ import annotations

import torch

from ..host import on_device
from ..kernels import RowSpans
from ..methods import concat_references, region_bounds
from .padding import row_stats

GROUP_ENTRIES = 1 << 21  # (row, head, entry) triples compressed in one batch: bounds the similarity blocks' memory
REWRITE_ELEMENTS = 1 << 26  # elements of a layer's rows rewritten in one gather (padded rows): bounds its copies' memory


def compress_together(layers: list) -> None:
    """Compress each layer down to its budget (:meth:`ClusteredLayer.compress` is this on one layer).

    Decoding-time compressions of the same shape (same span of recent entries and, unless the
    method takes a number per row, entries to remove: the layers of one model usually agree) run
    as one batch through the method, one set of kernel launches instead of one per layer; the
    layers of a method that takes a number to remove per row (``rowwise_remove``: ``chelsea``,
    whose uneven budgets remove different numbers) batch too, after a prefill as well (all layers
    then hold the same entries), up to :data:`GROUP_ENTRIES` entries per batch; other whole-cache
    compressions run one layer at a time. Padded layers compress row by row (:func:`_padded_rows`).

    A layer's reference queries (for a method that fits its merges to them) serve the first
    whole-cache compression after they were taken and are then let go; decoding-time compressions
    of a span, and padded rows, compress without them.
    """
    groups: dict[tuple, list[tuple]] = {}
    padded = []
    for layer in layers:
        layer.since_compression = 0
        if layer.row_since is not None and not layer.has_padding:
            layer.row_since = [0] * len(layer.row_since)
        if layer.length == 0:
            continue
        if layer.has_padding:
            padded.append(layer)
            continue
        n_remove = layer.length - layer.budget(layer.seen)
        if n_remove <= 0:
            layer.skipped_compressions += 1
            continue
        start = layer._local_start()
        rowwise = layer.method.rowwise_remove
        if start or rowwise:
            shape = (*layer.keys.shape[:2], *layer.keys.shape[3:], layer.keys.dtype)
            refs = None if layer.references is None else (layer.references.queries.shape, layer.references.scale)
            key = (layer.length - start, start > 0, None if rowwise else n_remove, shape, layer.config, layer.method, refs)
        else:
            key = (id(layer),)
        groups.setdefault(key, []).append((layer, start, n_remove))
    for group in groups.values():
        (layer, start, _), keys = group[0], group[0][0].keys
        per = max(1, GROUP_ENTRIES // (keys.shape[0] * keys.shape[1] * (layer.length - start)))
        for i in range(0, len(group), per):
            _dense_batch(group[i : i + per])
    if padded:
        _padded_rows(padded)
    for layer in layers:
        layer.references = None


def _dense_batch(group: list[tuple]) -> None:
    """Compress ``(layer, start, n_remove)`` layers of one shape as one batch of rows."""
    first, local = group[0][0], group[0][1] > 0
    rows = first.keys.shape[0]
    parts = [[getattr(layer, name)[:, :, start : layer.length] for layer, start, _ in group] for name in first._buffers]
    removes = [n for _, _, n in group]
    amount = removes[0] if len(set(removes)) == 1 else [n for n in removes for _ in range(rows)]
    refs = None if local else concat_references([layer.references for layer, _, _ in group])
    out = first._run(tuple(p[0] if len(p) == 1 else torch.cat(p) for p in parts), amount, sinks=0 if local else None,
                     references=refs)
    for i, (layer, start, n_remove) in enumerate(group):
        before = layer.length
        mine = tuple(t[i * rows : (i + 1) * rows] for t in out)
        if not isinstance(amount, int):
            mine = _trimmed(mine, layer, layer.length - start, n_remove, local)
        if start:
            layer._store_from(start, mine)
        else:
            layer._store(*mine)
        layer._record(before - layer.length)


def _trimmed(out: tuple, layer, span: int, n_remove: int, local: bool) -> tuple:
    """``out`` of a compression that removed a number per row, cut to this row's entries: a row that
    removed more than its batch's fewest holds padding after them."""
    lo, hi = region_bounds(span, 0 if local else layer.config.sink_tokens, layer.config.window)
    return tuple(t[:, :, : span - min(n_remove, hi - lo)] for t in out)


def _padded_rows(layers: list) -> None:
    """Padded rows (a padded prefill, a server's joined requests): the due rows of every layer that
    have as many entries to compress (and, unless the method takes a number to remove per row, as
    many to remove: ``chelsea``'s uneven layer budgets differ there) go through the method
    together. Their rows' statistics are read to the host in one transfer for all layers
    (:func:`~chelsea.cache.padding.row_stats`). Rows whose real entries are their last slots (as
    joins and compressions leave them) are read and written back all together on a GPU (one
    launch each, :class:`~chelsea.kernels.RowSpans`), elsewhere a layer's rows at a time
    (:meth:`~chelsea.cache.padding.Padding._rewrite_tails`); others one by one."""
    row_groups: dict[tuple, list[tuple]] = {}
    for layer, stats in zip(layers, row_stats(layers)):
        apart = id(layer) if layer.new_tokens > 1 else None  # a prefill's compressions are large: layer by layer
        for b, stored, n_remove, start, contiguous in layer._due_rows(stats):
            amount = None if layer.method.rowwise_remove else n_remove
            row_groups.setdefault((stored - start, amount, start > 0, apart), []).append((layer, b, stored, start, n_remove, contiguous))
    removed = {layer: 0 for layer in layers}
    lengths: dict = {layer: [] for layer in layers}
    for (span, _, local, _), items in row_groups.items():
        spans = _row_spans(items, span)
        blocks = [items] if spans is not None else _blocks(items, span)
        parts = [spans.read()] if spans is not None else [_read_block(block, span) for block in blocks]
        ordered = [item for block in blocks for item in block]  # the rows of what the method returns
        removes = [item[4] for item in ordered]
        amount = removes[0] if len(set(removes)) == 1 else removes
        out = items[0][0]._run(tuple(torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts)), amount,
                               sinks=0 if local else None)
        lo, hi = region_bounds(span, 0 if local else items[0][0].config.sink_tokens, items[0][0].config.window)
        kept = [span - min(n_remove, hi - lo) if not isinstance(amount, int) else out[0].shape[2] for *_, n_remove, _ in ordered]
        if spans is not None:
            spans.rewrite(out, kept)
        else:
            _write_blocks(blocks, span, out, kept)
        for (layer, _, stored, *_), k in zip(ordered, kept):
            removed[layer] = max(removed[layer], span - k)
            lengths[layer].append(stored - span + k)
    for layer, count in removed.items():
        if count and not layer.pinned:  # a pinned layer's buffers stay; re-pinning frees the padding
            # every row still holds at least its compressed length, so the shared padding in front
            # is at most the layer's length minus the longest row compressed now
            layer._drop_leading_padding(at_most=layer.length - max(lengths[layer]))
        layer._record(count)


def _write_blocks(blocks: list[list[tuple]], span: int, out: tuple[torch.Tensor, ...], kept: list[int]) -> None:
    """Write each block's compressed rows (its part of ``out``, the first ``kept`` entries of each)
    back into its layer, right-aligned: a layer's contiguous rows in one rewrite, others one by one."""
    first = 0
    for block in blocks:
        layer, mine, mine_kept = block[0][0], tuple(t[first : first + len(block)] for t in out), kept[first : first + len(block)]
        first += len(block)
        if block[0][5]:
            layer._rewrite_tails([item[1] for item in block], [item[2] for item in block], span, mine_kept, mine)
        else:
            (_, b, stored, start, _, contiguous), = block
            idx = layer._real_entries(b, stored, contiguous)
            row = tuple(t[:, :, : mine_kept[0]] for t in mine)
            if start:  # the entries before the re-compressed span, read once, ahead of the rewrite
                row = tuple(torch.cat([t, r], dim=2) for t, r in zip(layer._row(b, idx[:start]), row))
            layer._write_row(b, row)


def _row_spans(items: list[tuple], span: int) -> RowSpans | None:
    """The kernels' reader and writer of ``items`` (due rows of one compression group, possibly of
    many layers), where every row's real entries are its last slots and the kernels take the
    layers' buffers; ``None`` otherwise (the rows then go through :func:`_blocks`)."""
    if not all(item[5] for item in items):
        return None
    layers = [item[0] for item in items]
    buffers = [[getattr(layer, name) for layer in layers] for name in layers[0]._buffers]
    if len(buffers) != 3 or not RowSpans.applies(*buffers):
        return None
    return RowSpans(*buffers, [item[1] for item in items], [layer.length for layer in layers], [item[2] for item in items], span)


def _blocks(items: list[tuple], span: int) -> list[list[tuple]]:
    """``items`` (due rows of one compression group) as blocks read and written together: per
    layer, its rows whose real entries are their last slots (in pieces that bound the rewrite's
    memory), then every other row alone."""
    by_layer: dict = {}
    alone = []
    for item in items:
        if item[5]:
            by_layer.setdefault(item[0], []).append(item)
        else:
            alone.append([item])
    blocks = []
    for layer, rows in by_layer.items():
        per = max(1, REWRITE_ELEMENTS // max(1, layer.keys[:1].numel()))
        blocks += [rows[i : i + per] for i in range(0, len(rows), per)]
    return blocks + alone


def _read_block(block: list[tuple], span: int) -> tuple[torch.Tensor, ...]:
    """The entries to compress of a block's rows: the last ``span`` real entries of each."""
    layer, b, stored, start, _, contiguous = block[0]
    if contiguous:
        rows = on_device([item[1] for item in block], layer.device)
        return tuple(t[:, :, layer.length - span :].index_select(0, rows) for t in layer._entries())
    return layer._row(b, layer._real_entries(b, stored, contiguous)[start:])
