"""The due rows of many cache layers: their last entries read, then the rows rewritten, one launch each.

A server's decoding step compresses, in every layer, the rows whose schedule is due: it reads the
last ``span`` entries of each such row (keys, values, per-entry statistics), runs the method on all
of them together, and writes each row back right-aligned: the compressed span at the row's end,
the older entries moved up by what was removed, padding in front. In PyTorch that is a gather
and a copy per buffer and layer (about twenty operations per layer: several hundred per step for a
28-layer model, on the host), and the rewrite copies each row four times. Here a table of the
rows' buffer addresses and strides goes to the GPU once, one kernel reads every row's span and one
rewrites every row in place, moving its older entries once, from the back.

:class:`RowSpans` is used only where the kernels apply (CUDA, Triton); the PyTorch path is the
cache's own (:func:`chelsea.cache.compress_together`), and the tests hold the two equal.
"""

from __future__ import annotations

import torch

from ..host import on_device
from .layer_tails import same_layout

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# The table, one row of 15 numbers per item: the key, value and statistics buffers' addresses, the batch
# row, the layer's stored length, the row's real entries, then the (row, head, entry) strides of the key,
# value and statistics buffers.


if triton is not None:
    from .layer_tails import copy_entries

    @triton.jit
    def _item(Table, heads, K, V, C):
        """This program's item and head; the row's key, value and statistics bases and entry
        strides; the layer's stored length and the row's real entries (the table's columns)."""
        ih = tl.program_id(0)
        item = (ih // heads).to(tl.int64)
        h = (ih % heads).to(tl.int64)
        row = Table + item * 15
        b = tl.load(row + 3)
        k_base = tl.load(row).to(tl.pointer_type(K.dtype.element_ty)) + b * tl.load(row + 6) + h * tl.load(row + 7)
        v_base = tl.load(row + 1).to(tl.pointer_type(V.dtype.element_ty)) + b * tl.load(row + 9) + h * tl.load(row + 10)
        c_base = tl.load(row + 2).to(tl.pointer_type(C.dtype.element_ty)) + b * tl.load(row + 12) + h * tl.load(row + 13)
        return (item, h, k_base, v_base, c_base, tl.load(row + 8), tl.load(row + 11), tl.load(row + 14), tl.load(row + 4),
                tl.load(row + 5))

    @triton.jit
    def _read_spans_kernel(Table, KOut, VOut, COut, heads, span, dim, dim_v, channels,
                           so_i, so_h, so_n, vo_i, vo_h, vo_n, co_i, co_h, co_n,
                           D: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr, BN: tl.constexpr):
        item, h, k_base, v_base, c_base, k_step, v_step, c_step, length, stored = _item(Table, heads, KOut, VOut, COut)
        start = length - span
        copy_entries(KOut + item * so_i + h * so_h, so_n, k_base + start * k_step, k_step, span, dim, D, BN)
        copy_entries(VOut + item * vo_i + h * vo_h, vo_n, v_base + start * v_step, v_step, span, dim_v, DV, BN)
        copy_entries(COut + item * co_i + h * co_h, co_n, c_base + start * c_step, c_step, span, channels, CH, BN)

    @triton.jit
    def _rewrite_rows_kernel(Table, Kept, KT, VT, CT, heads, span, dim, dim_v, channels,
                             st_i, st_h, st_n, vt_i, vt_h, vt_n, ct_i, ct_h, ct_n,
                             D: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr, BN: tl.constexpr):
        item, h, k_base, v_base, c_base, k_step, v_step, c_step, length, stored = _item(Table, heads, KT, VT, CT)
        kept = tl.load(Kept + item)
        d, dv, c = tl.arange(0, D)[None, :], tl.arange(0, DV)[None, :], tl.arange(0, CH)[None, :]
        removed = span - kept
        first, end = length - stored, length - span  # the entries before the span: [first, end)
        # They move up by `removed`, block by block from the back, so no block is overwritten before
        # it is read; inside a block every thread loads before any stores (the barrier).
        for t in tl.range(0, tl.cdiv(end - first, BN)):
            j = end - (t + 1) * BN + tl.arange(0, BN)[:, None]
            live = j >= first
            mk, mv, mc = live & (d < dim), live & (dv < dim_v), live & (c < channels)
            k = tl.load(k_base + j * k_step + d, mask=mk)
            v = tl.load(v_base + j * v_step + dv, mask=mv)
            s = tl.load(c_base + j * c_step + c, mask=mc)
            tl.debug_barrier()
            tl.store(k_base + (j + removed) * k_step + d, k, mask=mk)
            tl.store(v_base + (j + removed) * v_step + dv, v, mask=mv)
            tl.store(c_base + (j + removed) * c_step + c, s, mask=mc)
            tl.debug_barrier()
        tail = length - kept  # the compressed span goes to the row's end
        copy_entries(k_base + tail * k_step, k_step, KT + item * st_i + h * st_h, st_n, kept, dim, D, BN)
        copy_entries(v_base + tail * v_step, v_step, VT + item * vt_i + h * vt_h, vt_n, kept, dim_v, DV, BN)
        copy_entries(c_base + tail * c_step, c_step, CT + item * ct_i + h * ct_h, ct_n, kept, channels, CH, BN)
        for j0 in tl.range(0, removed, BN):  # padding where the first entries were: zero keys and
            j = j0 + tl.arange(0, BN)[:, None]  # values, log-count -inf, every other statistic 0
            mk, mv, mc = (j < removed) & (d < dim), (j < removed) & (dv < dim_v), (j < removed) & (c < channels)
            slot = first + j
            tl.store(k_base + slot * k_step + d, tl.zeros([BN, D], dtype=KT.dtype.element_ty), mask=mk)
            tl.store(v_base + slot * v_step + dv, tl.zeros([BN, DV], dtype=VT.dtype.element_ty), mask=mv)
            pad = tl.where(c == 0, float("-inf"), 0.0) + tl.zeros([BN, CH], dtype=tl.float32)
            tl.store(c_base + slot * c_step + c, pad.to(CT.dtype.element_ty), mask=mc)


class RowSpans:
    """Item ``i``: row ``rows[i]`` of the buffers ``keys[i]``, ``values[i]``, ``counts[i]`` (one
    layer's ``[batch, heads, capacity, dim]`` keys and values and ``[batch, heads, capacity(,
    channels)]`` statistics), filled up to ``lengths[i]``, whose last ``stored[i]`` slots are its
    real entries; its last ``span`` entries are compressed. Items may share a layer (distinct rows)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], counts: list[torch.Tensor], rows: list[int],
                 lengths: list[int], stored: list[int], span: int):
        self.keys, self.values, self.span = keys, values, span
        self.counts = [c if c.dim() == 4 else c.unsqueeze(-1) for c in counts]
        self.flat = counts[0].dim() == 3  # statistics without a channel dimension (log-counts only)
        device = keys[0].device
        table = [[k.data_ptr(), v.data_ptr(), c.data_ptr(), b, n, s, *k.stride()[:3], *v.stride()[:3], *c.stride()[:3]]
                 for k, v, c, b, n, s in zip(keys, values, self.counts, rows, lengths, stored)]
        self.table = on_device(table, device, torch.int64)

    @staticmethod
    def applies(keys: list[torch.Tensor], values: list[torch.Tensor], counts: list[torch.Tensor]) -> bool:
        """Whether the kernels take these buffers: on CUDA, of one layout
        (:func:`~chelsea.kernels.layer_tails.same_layout`)."""
        if triton is None or not keys or not keys[0].is_cuda:
            return False
        return same_layout(keys, values, counts)

    def _sizes(self) -> dict:
        dim, dim_v, channels = self.keys[0].shape[3], self.values[0].shape[3], self.counts[0].shape[3]
        return dict(D=triton.next_power_of_2(dim), DV=triton.next_power_of_2(dim_v), CH=triton.next_power_of_2(channels))

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every item's last ``span`` entries: keys ``[items, heads, span, dim]``, values, statistics
        ``[items, heads, span(, channels)]``."""
        items, heads, span = len(self.keys), self.keys[0].shape[1], self.span
        k_out = self.keys[0].new_empty(items, heads, span, self.keys[0].shape[3])
        v_out = self.values[0].new_empty(items, heads, span, self.values[0].shape[3])
        c_out = self.counts[0].new_empty(items, heads, span, self.counts[0].shape[3])
        if items and span:
            _read_spans_kernel[(items * heads,)](
                self.table, k_out, v_out, c_out, heads, span, k_out.shape[3], v_out.shape[3], c_out.shape[3],
                *k_out.stride()[:3], *v_out.stride()[:3], *c_out.stride()[:3], **self._sizes(), BN=32)
        return k_out, v_out, c_out[..., 0] if self.flat else c_out

    def rewrite(self, tails: tuple[torch.Tensor, torch.Tensor, torch.Tensor], kept: list[int]) -> None:
        """Write item ``i``'s compressed span, the first ``kept[i]`` entries of ``tails`` (keys,
        values, statistics, item-major like :meth:`read`), at its row's end; its entries before
        the span move up by ``span - kept[i]`` and padding fills the slots they leave."""
        keys, values, counts = tails
        if counts.dim() == 3:
            counts = counts.unsqueeze(-1)
        if any(t.stride(3) != 1 for t in (keys, values, counts)):
            keys, values, counts = (t.contiguous() for t in (keys, values, counts))
        items, heads = len(self.keys), self.keys[0].shape[1]
        if not items:
            return
        _rewrite_rows_kernel[(items * heads,)](
            self.table, on_device(kept, keys.device), keys, values, counts, heads, self.span, keys.shape[3], values.shape[3],
            counts.shape[3], *keys.stride()[:3], *values.stride()[:3], *counts.stride()[:3], **self._sizes(), BN=32)
