"""Compressing layers: each down to its budget, many layers as one batch where they agree.

Every (row, KV head) is compressed on its own, so batching layers (or rows) together gives the
same entries as compressing them one by one; it only saves kernel launches.
"""

from __future__ import annotations

import torch

from ..methods import concat_references, region_bounds

GROUP_ENTRIES = 1 << 21  # (row, head, entry) triples compressed in one batch: bounds the similarity blocks' memory


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
            layer.row_since.zero_()
        if layer.length == 0:
            continue
        if layer.has_padding and layer.pinned:
            layer._compress_padded()
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
    together. Their rows' statistics are read to the host in one transfer for all layers."""
    row_groups: dict[tuple, list[tuple]] = {}
    stats = torch.cat([layer._row_stats().cpu() for layer in layers], dim=1).tolist()
    offset = 0
    for layer in layers:
        rows = layer.keys.shape[0]
        apart = id(layer) if layer.new_tokens > 1 else None  # a prefill's compressions are large: layer by layer
        for b, idx, n_remove, start in layer._due_rows([r[offset : offset + rows] for r in stats]):
            amount = None if layer.method.rowwise_remove else n_remove
            row_groups.setdefault((idx.numel() - start, amount, start > 0, apart), []).append((layer, b, idx, start, n_remove))
        offset += rows
    removed = {layer: 0 for layer in layers}
    lengths: dict = {layer: [] for layer in layers}
    for (span, _, local, _), items in row_groups.items():
        parts = [layer._row(b, idx[start:]) for layer, b, idx, start, _ in items]
        removes = [n for *_, n in items]
        amount = removes[0] if len(set(removes)) == 1 else removes
        out = items[0][0]._run(tuple(torch.cat(p) for p in zip(*parts)), amount, sinks=0 if local else None)
        for i, (layer, b, idx, start, n_remove) in enumerate(items):
            row = tuple(t[i : i + 1] for t in out)
            if not isinstance(amount, int):
                row = _trimmed(row, layer, span, n_remove, local)
            if start:  # the entries before the re-compressed span, read once, ahead of the rewrite
                row = tuple(torch.cat([t, r], dim=2) for t, r in zip(layer._row(b, idx[:start]), row))
            layer._write_row(b, row)
            removed[layer] = max(removed[layer], idx.numel() - row[0].shape[2])
            lengths[layer].append(row[0].shape[2])
    for layer, count in removed.items():
        if count:
            # every row still holds at least its compressed length, so the shared padding in front
            # is at most the layer's length minus the longest row compressed now
            layer._drop_leading_padding(at_most=layer.length - max(lengths[layer]))
        layer._record(count)
