"""The learned scorer's prediction for the newest entries of every layer, in two launches.

:mod:`chelsea.scoring.learned` scores an entry with a per-layer linear map of its features (every
KV head's value and the norms of its key's rotary pairs, and a 1). After a decoding step that is
one new token per row and layer: a few dozen small PyTorch operations for all layers together,
which cost a server's host more time than the GPU spends on them. Here one kernel reads each
layer's newest keys and values straight from the cache buffers (:class:`.layer_tails.LayerTails`'
address table) and applies the layer's map; a second averages the predicted agreement over the
layers and writes every entry's score, ``exp(min(log-score, 1)) + fact_weight * agreement``, into
the buffers. The PyTorch path (:meth:`chelsea.scoring.learned.LearnedScorer.score_new`) computes the
same on the CPU.
"""

from __future__ import annotations

import torch

from .layer_tails import LayerTails, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _predict_kernel(Table, W, Y, heads, n, dim_v, half, features, outputs,
                        sw_l, sw_f, sy_l, sy_b, sy_n,
                        DV: tl.constexpr, DH: tl.constexpr, OP: tl.constexpr, BN: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        layer = tl.program_id(1)
        j = tl.program_id(2) * BN + tl.arange(0, BN)
        row = Table + layer * 13
        keys = tl.load(row).to(tl.pointer_type(tl.bfloat16))
        values = tl.load(row + 1).to(tl.pointer_type(tl.bfloat16))
        start = tl.load(row + 3)
        k_step, v_step = tl.load(row + 6), tl.load(row + 9)
        dv = tl.arange(0, DV)
        dh = tl.arange(0, DH)
        o = tl.arange(0, OP)
        w = W + layer.to(tl.int64) * sw_l
        acc = tl.zeros([BN, OP], dtype=tl.float32)
        for h in tl.range(0, heads):
            k_base = keys + b * tl.load(row + 4) + h * tl.load(row + 5) + (start + j[:, None]) * k_step
            v_base = values + b * tl.load(row + 7) + h * tl.load(row + 8) + (start + j[:, None]) * v_step
            mv = (j[:, None] < n) & (dv[None, :] < dim_v)
            mh = (j[:, None] < n) & (dh[None, :] < half)
            v = tl.load(v_base + dv[None, :], mask=mv, other=0.0).to(tl.float32)
            k1 = tl.load(k_base + dh[None, :], mask=mh, other=0.0).to(tl.float32)
            k2 = tl.load(k_base + half + dh[None, :], mask=mh, other=0.0).to(tl.float32)
            pairs = tl.sqrt(k1 * k1 + k2 * k2)
            f0 = h * (dim_v + half)
            wv = tl.load(w + (f0 + dv[:, None]) * sw_f + o[None, :], mask=(dv[:, None] < dim_v) & (o[None, :] < outputs), other=0.0)
            wp = tl.load(w + (f0 + dim_v + dh[:, None]) * sw_f + o[None, :], mask=(dh[:, None] < half) & (o[None, :] < outputs), other=0.0)
            acc += tl.dot(v, wv, input_precision="ieee") + tl.dot(pairs, wp, input_precision="ieee")
        acc += tl.load(w + features * sw_f + o, mask=o < outputs, other=0.0)[None, :]  # the constant feature's row
        y = Y + layer.to(tl.int64) * sy_l + b * sy_b
        tl.store(y + j[:, None] * sy_n + o[None, :], acc, mask=(j[:, None] < n) & (o[None, :] < outputs))

    @triton.jit
    def _score_kernel(Table, Y, layers, heads, n, channel, fact_weight, sy_l, sy_b, sy_n, BN: tl.constexpr):
        bh = tl.program_id(0)  # rows x heads first: the grid's first dimension is the one without a 65,535 cap
        layer = tl.program_id(1)
        b = (bh // heads).to(tl.int64)
        h = bh % heads
        row = Table + layer * 13
        counts = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        start = tl.load(row + 3)
        base = counts + b * tl.load(row + 10) + h * tl.load(row + 11) + channel
        step = tl.load(row + 12)
        for j0 in tl.range(0, n, BN):
            j = j0 + tl.arange(0, BN)
            ok = j < n
            agreed = tl.zeros([BN], dtype=tl.float32)
            for other in tl.range(0, layers):
                agreed += tl.load(Y + other * sy_l + b * sy_b + j * sy_n + heads, mask=ok, other=0.0)
            own = tl.load(Y + layer.to(tl.int64) * sy_l + b * sy_b + j * sy_n + h, mask=ok, other=0.0)
            score = tl.exp(tl.minimum(own, 1.0)) + fact_weight * (agreed / layers)
            tl.store(base + (start + j) * step, score, mask=ok)


def fused_scoring_applies(tails: LayerTails, weights: torch.Tensor) -> bool:
    """Whether :func:`score_tails` runs for ``tails`` (bf16 keys and values on a CUDA device,
    float32 statistics) with stacked maps ``weights`` ``[layers, F + 1, heads + 1]``."""
    k0, v0 = tails.keys[0], tails.values[0]
    heads = k0.shape[1]
    return (tails.kernel and k0.dtype == torch.bfloat16 and v0.dtype == torch.bfloat16
            and tails.counts[0].dtype == torch.float32 and k0.shape[-1] % 2 == 0 and weights.is_cuda
            and weights.dtype == torch.float32 and weights.is_contiguous()
            and tuple(weights.shape) == (len(tails.keys), heads * (v0.shape[-1] + k0.shape[-1] // 2) + 1, heads + 1))


def score_tails(tails: LayerTails, weights: torch.Tensor, fact_weight: float) -> None:
    """Write every layer's predicted scores for its newest entries (into channel ``tails.channel``
    of their statistics; see the module doc); needs :func:`fused_scoring_applies`."""
    batch, heads, _, dim = tails.keys[0].shape
    dim_v, half, n, layers = tails.values[0].shape[-1], dim // 2, tails.n, len(tails.keys)
    outputs = heads + 1
    y = torch.empty(layers, batch, n, outputs, dtype=torch.float32, device=tails.keys[0].device)
    table = tails.table()
    bn = 16 if n <= 16 else 32
    _predict_kernel[(batch, layers, triton.cdiv(n, bn))](
        table, weights, y, heads, n, dim_v, half, weights.shape[1] - 1, outputs, weights.stride(0), weights.stride(1),
        y.stride(0), y.stride(1), y.stride(2),
        DV=max(16, triton.next_power_of_2(dim_v)), DH=max(16, triton.next_power_of_2(half)),
        OP=max(16, triton.next_power_of_2(outputs)), BN=bn)
    _score_kernel[(batch * heads, layers)](table, y, layers, heads, n, tails.channel, float(fact_weight), y.stride(0), y.stride(1),
                                          y.stride(2), BN=min(128, triton.next_power_of_2(n)))
