"""One decoding step's key and value written into a pinned cache layer at a device-side slot.

A pinned layer (:meth:`chelsea.cache.ClusteredLayer.pin`) takes each new token at ``slot``, an
index held on the GPU so that a replayed CUDA graph writes where the host last left it. In PyTorch
that is an ``index_copy_`` per buffer and an ``index_fill_`` per per-entry statistic (the log-count
and, for H2O and SnapKV, the attention score), three or four launches per layer and step; the
Triton kernel does it in one. On the CPU (or without Triton) the PyTorch ops run.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _slot_write_kernel(
        Slot, K_new, V_new, K_buf, V_buf, Z0, Z1,
        stride_knb, stride_knh, stride_knd, stride_vnb, stride_vnh, stride_vnd,
        stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
        stride_zb, stride_zh, stride_zn,
        heads, dim, dim_v,
        ZEROED: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = (bh // heads).to(tl.int64)  # batch offsets of large caches pass 2**31 elements
        h = bh % heads
        slot = tl.load(Slot)
        d = tl.arange(0, D)
        k = tl.load(K_new + b * stride_knb + h * stride_knh + d * stride_knd, mask=d < dim)
        tl.store(K_buf + b * stride_kb + h * stride_kh + slot * stride_kn + d * stride_kd, k, mask=d < dim)
        dv = tl.arange(0, DV)
        v = tl.load(V_new + b * stride_vnb + h * stride_vnh + dv * stride_vnd, mask=dv < dim_v)
        tl.store(V_buf + b * stride_vb + h * stride_vh + slot * stride_vn + dv * stride_vd, v, mask=dv < dim_v)
        z = b * stride_zb + h * stride_zh + slot * stride_zn
        if ZEROED >= 1:
            tl.store(Z0 + z, 0.0)
        if ZEROED >= 2:
            tl.store(Z1 + z, 0.0)


def write_slot(slot: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_buf: torch.Tensor, value_buf: torch.Tensor,
               *zeroed: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[batch, heads, 1, dim]`` at entry ``slot`` (a one-element long
    tensor) of ``key_buf``/``value_buf`` ``[batch, heads, capacity, dim]`` and set that entry of
    each of ``zeroed`` (at most two ``[batch, heads, capacity]`` float32 tensors of the same
    strides) to 0."""
    if triton is None or not key_buf.is_cuda or len(zeroed) > 2 or any(z.stride() != zeroed[0].stride() for z in zeroed):
        key_buf.index_copy_(2, slot, key)
        value_buf.index_copy_(2, slot, value)
        for z in zeroed:
            z.index_fill_(2, slot, 0.0)
        return
    batch, heads, _, dim = key_buf.shape
    dim_v = value_buf.shape[-1]
    z0 = zeroed[0] if zeroed else key_buf
    z1 = zeroed[1] if len(zeroed) > 1 else z0
    z_strides = z0.stride() if zeroed else (0, 0, 0)
    _slot_write_kernel[(batch * heads,)](
        slot, key, value, key_buf, value_buf, z0, z1,
        key.stride(0), key.stride(1), key.stride(3), value.stride(0), value.stride(1), value.stride(3),
        *key_buf.stride(), *value_buf.stride(), *z_strides,
        heads, dim, dim_v,
        ZEROED=len(zeroed), D=triton.next_power_of_2(dim), DV=triton.next_power_of_2(dim_v),
    )
