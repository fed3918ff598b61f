"""The newest entries of every cache layer, read and written in one launch each.

A decoding step that scores its new tokens (:mod:`chelsea.scoring.learned`) reads each layer's
newest keys and values and writes each layer's new scores. The layers' buffers are separate
tensors of different capacities and lengths, so in PyTorch that is a slice and a copy per layer
and direction: about sixty launches and a hundred host-side ops for a 28-layer model, each step.
Here the layers' buffer addresses, strides and tail starts go to the GPU as one small table and
one kernel reads (or writes) every layer's tail, as Triton's grouped-GEMM tutorial passes a
group's pointers. On the CPU (or without Triton) the PyTorch ops run; both give the same tensors.
"""

from __future__ import annotations

import torch

from ..host import on_device

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def copy_entries(dst, dst_step, src, src_step, n, width, W: tl.constexpr, BN: tl.constexpr):
        """Entries ``0..n-1`` of ``src`` (``width`` contiguous elements each, ``src_step`` apart)
        to ``dst`` (``dst_step`` apart), ``BN`` entries at a time; ``W``: ``width`` rounded up to a
        power of two."""
        w = tl.arange(0, W)[None, :]
        for j0 in tl.range(0, n, BN):
            j = j0 + tl.arange(0, BN)[:, None]
            m = (j < n) & (w < width)
            tl.store(dst + j * dst_step + w, tl.load(src + j * src_step + w, mask=m), mask=m)

    @triton.jit
    def _read_tails_kernel(Table, KOut, VOut, heads, n, dim, dim_v, so_l, so_b, so_h, so_n, sv_l, sv_b, sv_h, sv_n,
                           D: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr):
        bh = tl.program_id(0)  # rows x heads first: the grid's first dimension is the one without a 65,535 cap
        layer = tl.program_id(1)
        b = (bh // heads).to(tl.int64)
        h = (bh % heads).to(tl.int64)
        row = Table + layer * 13
        keys = tl.load(row).to(tl.pointer_type(KOut.dtype.element_ty))
        values = tl.load(row + 1).to(tl.pointer_type(VOut.dtype.element_ty))
        start = tl.load(row + 3)
        k_base = keys + b * tl.load(row + 4) + h * tl.load(row + 5)
        v_base = values + b * tl.load(row + 7) + h * tl.load(row + 8)
        k_step, v_step = tl.load(row + 6), tl.load(row + 9)
        ko = KOut + layer.to(tl.int64) * so_l + b * so_b + h * so_h
        vo = VOut + layer.to(tl.int64) * sv_l + b * sv_b + h * sv_h
        copy_entries(ko, so_n, k_base + start * k_step, k_step, n, dim, D, BN)
        copy_entries(vo, sv_n, v_base + start * v_step, v_step, n, dim_v, DV, BN)

    @triton.jit
    def _write_tails_kernel(Table, Scores, heads, n, channel, ss_l, ss_b, ss_h, ss_n, BN: tl.constexpr):
        bh = tl.program_id(0)  # rows x heads first: the grid's first dimension is the one without a 65,535 cap
        layer = tl.program_id(1)
        b = (bh // heads).to(tl.int64)
        h = (bh % heads).to(tl.int64)
        row = Table + layer * 13
        counts = tl.load(row + 2).to(tl.pointer_type(Scores.dtype.element_ty))
        start = tl.load(row + 3)
        base = counts + b * tl.load(row + 10) + h * tl.load(row + 11) + channel
        step = tl.load(row + 12)
        src = Scores + layer.to(tl.int64) * ss_l + b * ss_b + h * ss_h
        for j0 in tl.range(0, n, BN):
            j = j0 + tl.arange(0, BN)
            tl.store(base + (start + j) * step, tl.load(src + j * ss_n, mask=j < n), mask=j < n)


class LayerTails:
    """The last ``n`` entries before ``ends[i]`` of layer ``i``'s buffers: keys and values
    ``[batch, heads, capacity, dim]`` and per-entry statistics ``counts`` ``[batch, heads,
    capacity, channels]`` float32, of which :meth:`write` sets channel ``channel`` (all layers of
    the same batch, heads, dtypes and device)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], counts: list[torch.Tensor], ends: list[int], n: int,
                 channel: int):
        self.keys, self.values, self.counts, self.n, self.channel = keys, values, counts, n, channel
        self.starts = [end - n for end in ends]
        self._table: torch.Tensor | None = None
        self.uniform = _uniform(keys, values, counts)  # one stack (one launch on a GPU) serves every layer
        self.kernel = triton is not None and keys[0].is_cuda and self.uniform

    @property
    def elements(self) -> int:
        """Key elements the tails hold, all layers together."""
        batch, heads, _, dim = self.keys[0].shape
        return len(self.keys) * batch * heads * dim * self.n

    def table(self) -> torch.Tensor:
        """``[layers, 13]`` int64 on the device, per layer: the key, value and statistics buffers'
        addresses, the tail's first entry, then the (row, head, entry) strides of the key, value and
        statistics buffers (the kernels read it by these column numbers)."""
        if self._table is None:
            rows = [[k.data_ptr(), v.data_ptr(), c.data_ptr(), s, *k.stride()[:3], *v.stride()[:3], *c.stride()[:3]]
                    for k, v, c, s in zip(self.keys, self.values, self.counts, self.starts)]
            self._table = on_device(rows, self.keys[0].device, torch.int64)
        return self._table

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's tail keys and values, ``[layers, batch, heads, n, dim]`` each (needs :attr:`uniform`)."""
        n, first = self.n, self.keys[0]
        if not self.kernel:
            return (torch.stack([k[:, :, s : s + n] for k, s in zip(self.keys, self.starts)]),
                    torch.stack([v[:, :, s : s + n] for v, s in zip(self.values, self.starts)]))
        batch, heads, _, dim = first.shape
        dim_v = self.values[0].shape[-1]
        k_out = first.new_empty(len(self.keys), batch, heads, n, dim)
        v_out = self.values[0].new_empty(len(self.keys), batch, heads, n, dim_v)
        _read_tails_kernel[(batch * heads, len(self.keys))](
            self.table(), k_out, v_out, heads, n, dim, dim_v, *k_out.stride()[:4], *v_out.stride()[:4],
            D=triton.next_power_of_2(dim), DV=triton.next_power_of_2(dim_v), BN=min(16, triton.next_power_of_2(n)))
        return k_out, v_out

    def write(self, stats: torch.Tensor) -> None:
        """Set the channel of every layer's tail statistics to ``stats`` ``[layers, batch, heads, n]``."""
        n, channel = self.n, self.channel
        if not self.kernel or stats.dtype != self.counts[0].dtype:
            for c, s, part in zip(self.counts, self.starts, stats):
                c[:, :, s : s + n, channel] = part
            return
        batch, heads = stats.shape[1:3]
        _write_tails_kernel[(batch * heads, len(self.counts))](
            self.table(), stats, heads, n, channel, *stats.stride(), BN=min(128, triton.next_power_of_2(n)))


def same_layout(keys: list[torch.Tensor], values: list[torch.Tensor], counts: list[torch.Tensor]) -> bool:
    """Whether one table-driven launch can serve all these buffers (one layer's each): one
    device, one dtype per buffer kind, statistics of one rank, the same heads and entry sizes,
    each entry's last dimension contiguous."""
    k0, v0, c0 = keys[0], values[0], counts[0]
    return all(k.device == k0.device and v.device == k0.device and c.device == k0.device
               and k.dtype == k0.dtype and v.dtype == v0.dtype and c.dtype == c0.dtype and c.dim() == c0.dim()
               and k.shape[1] == k0.shape[1] and v.shape[1] == k0.shape[1] and c.shape[1] == k0.shape[1]
               and k.shape[3:] == k0.shape[3:] and v.shape[3:] == v0.shape[3:] and c.shape[3:] == c0.shape[3:]
               and k.stride(3) == 1 and v.stride(3) == 1 and (c.dim() == 3 or c.stride(3) == 1)
               for k, v, c in zip(keys, values, counts))


def _uniform(keys: list[torch.Tensor], values: list[torch.Tensor], counts: list[torch.Tensor]) -> bool:
    """Whether one launch (one stack) can serve every layer's tail: :func:`same_layout`, the same
    batch rows, statistics with a channel dimension."""
    return (same_layout(keys, values, counts) and counts[0].dim() == 4
            and all(k.shape[0] == keys[0].shape[0] and v.shape[0] == keys[0].shape[0] for k, v in zip(keys, values)))
