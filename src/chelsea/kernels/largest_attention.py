"""Triton kernels for the context-reconstruction scores: the largest attention each key receives.

Given queries ``[batch, heads, m, d]`` and keys ``[batch, kv_heads, old + m, d]`` (``old`` entries
every query sees, then the queries' own entries, seen causally) and a per-key bias, the score of
each of the ``old`` keys is ``max`` over the queries and over the query heads reading its KV head
of ``softmax(q . k * scale + bias)``. Written out in PyTorch that is several passes over a float32
logits tensor per block of queries (``chelsea.scoring.reconstruction._largest_attention_torch``, the CPU path);
here the logits stay in registers:

1. :func:`_normaliser_kernel`, one program per (row, query head, block of queries): the online
   log-sum-exp of each query's logits over the keys it sees (flash attention without the values).
2. :func:`_maximum_kernel`, one program per (row, KV head, block of keys, query head of the group):
   the largest ``logit - log-normaliser`` of each key over all queries. The group's heads write
   separate rows, reduced afterwards, so nothing is atomic and the result is deterministic.

When the caller already has each query's log-normaliser (the flash attention kernel that computes
the repeat's output returns it: :func:`chelsea.attention.causal_attention_with_normaliser`), it
passes it as ``lse`` and the first kernel is skipped.

The scores come back as probabilities, ``[batch, kv_heads, old]`` float32. This module imports
nothing from the rest of the package.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None


if triton is not None:

    @triton.jit
    def _normaliser_kernel(
        Q, K, Bias, Lse,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_bb, stride_bh, stride_bn,
        heads, groups, m, old, scale,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D: tl.constexpr, DIM: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = (bh // heads).to(tl.int64)
        h = bh % heads
        kvh = h // groups
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        row_ok = rows < m
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (d[None, :] < DIM), other=0.0)
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite, so a block of hidden keys gives no NaN
        l_i = tl.zeros([BLOCK_M], tl.float32)
        last = (tl.program_id(1) + 1) * BLOCK_M  # the block's last query sees the keys up to its own
        if last > m:
            last = m
        end = old + last
        for n0 in range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            k = tl.load(K + b * stride_kb + kvh * stride_kh + n[None, :] * stride_kn + d[:, None] * stride_kd,
                        mask=n_ok[None, :] & (d[:, None] < DIM), other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            if HAS_BIAS:
                s += tl.load(Bias + b * stride_bb + kvh * stride_bh + n * stride_bn, mask=n_ok, other=float("-inf"))[None, :]
            visible = n_ok[None, :] & ((n[None, :] < old) | (n[None, :] - old <= rows[:, None]))
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(Lse + bh * m + rows, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _maximum_kernel(
        Q, K, Bias, Lse, Out,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_bb, stride_bh, stride_bn,
        batch, kv_heads, groups, m, old, scale,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D: tl.constexpr, DIM: tl.constexpr,
    ):
        bk = tl.program_id(0)
        g = tl.program_id(2)
        b = (bk // kv_heads).to(tl.int64)
        kvh = bk % kv_heads
        h = kvh * groups + g
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < old
        d = tl.arange(0, D)
        k = tl.load(K + b * stride_kb + kvh * stride_kh + n[None, :] * stride_kn + d[:, None] * stride_kd,
                    mask=n_ok[None, :] & (d[:, None] < DIM), other=0.0)
        if HAS_BIAS:
            bias = tl.load(Bias + b * stride_bb + kvh * stride_bh + n * stride_bn, mask=n_ok, other=float("-inf"))
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        lse_base = (b * kv_heads * groups + h) * m
        for m0 in range(0, m, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < m
            q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + d[None, :] * stride_qd,
                        mask=row_ok[:, None] & (d[None, :] < DIM), other=0.0)
            lse = tl.load(Lse + lse_base + rows, mask=row_ok, other=float("inf"))
            s = tl.dot(q, k, input_precision=PRECISION) * scale - lse[:, None]
            if HAS_BIAS:
                s += bias[None, :]
            best = tl.maximum(best, tl.max(s, 0))
        tl.store(Out + ((g * batch + b) * kv_heads + kvh) * old + n, best, mask=n_ok)


def largest_attention_applies(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether :func:`largest_attention_kernel` takes these tensors (CUDA, Triton, a float dtype)."""
    return (
        triton is not None
        and query.is_cuda
        and key.is_cuda
        and query.dtype == key.dtype
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and 16 <= query.shape[-1] <= 256
    )


def largest_attention_kernel(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, old: int, scale: float,
                             *, log_weight: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                             block_m: int = 64, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """``[batch, kv_heads, old]`` float32: the largest softmax attention each of the first ``old``
    keys receives (see the module doc); the caller has checked :func:`largest_attention_applies`.

    ``query`` ``[batch, heads, m, d]``, ``key`` ``[batch, kv_heads, old + m, d]``, ``bias``
    ``[batch, kv_heads | 1, old + m]`` added to the logits (``-inf`` hides a key) or ``None``.
    ``log_weight`` ``[batch, kv_heads, groups, old]`` is added to each query head's largest
    log-probability before the maximum over the group's heads (or ``None``).
    ``lse`` ``[batch, heads, m]``: each query's log-normaliser over the keys it sees, bias
    included, when the caller has it (or ``None``: computed here).
    """
    batch, heads, m, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if key.shape[2] != old + m:
        raise ValueError(f"keys must be the {old} scored entries and the {m} queries' own; got {key.shape[2]}")
    dpow = max(16, triton.next_power_of_2(dim))
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    f32 = dict(device=query.device, dtype=torch.float32)
    has_bias = bias is not None
    if has_bias:
        bias = bias.float()
        bias_strides = (bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0, bias.stride(2))
    else:
        bias, bias_strides = torch.empty(1, **f32), (0, 0, 0)
    common = dict(HAS_BIAS=has_bias, PRECISION=precision,
                  BLOCK_M=block_m, BLOCK_N=block_n, D=dpow, DIM=dim, num_warps=num_warps)
    if lse is not None:
        if lse.shape != (batch, heads, m):
            raise ValueError(f"lse must be [batch, heads, queries] = {[batch, heads, m]}; got {list(lse.shape)}")
        lse = lse.float().contiguous().view(batch * heads, m)
    else:
        lse = torch.empty(batch * heads, m, **f32)
        _normaliser_kernel[(batch * heads, triton.cdiv(m, block_m))](
            query, key, bias, lse, *query.stride(), *key.stride(), *bias_strides,
            heads, groups, m, old, scale, **common,
        )
    out = torch.empty(groups, batch, kv_heads, old, **f32)
    if old > 0:
        _maximum_kernel[(batch * kv_heads, triton.cdiv(old, block_n), groups)](
            query, key, bias, lse, out, *query.stride(), *key.stride(), *bias_strides,
            batch, kv_heads, groups, m, old, scale, **common,
        )
    if log_weight is not None:
        out += log_weight.float().permute(2, 0, 1, 3)
    return out.amax(0).exp()
