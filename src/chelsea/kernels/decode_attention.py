"""Triton decode attention over a clustered cache (flash-decoding with a per-entry bias).

For each (batch row, KV head) the query heads of its group, times the few new query tokens, are
stacked into one block of rows, so every key and value of that KV head is read from memory once.
The sequence is split into ``splits`` parts processed by separate programs (flash-decoding); each
keeps an online softmax (running max, sum and weighted values) and a second small kernel merges
the parts. Each entry's log-count is added to its logit; ``-inf`` hides an entry. The last
``q_len`` entries are the new tokens themselves and are attended causally.

:func:`run_kernel` takes and returns the same tensors as
:func:`chelsea.attention.weighted_attention`, which calls it where :func:`kernel_applies` (CUDA,
Triton present, head sizes that are powers of two, at most 16 query tokens) and otherwise runs
the PyTorch path; this module imports nothing from the rest of the package.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None


if triton is not None:

    @triton.jit
    def _split_kernel(
        Q, K, V, Bias, M_out, L_out, Acc_out,
        stride_qb, stride_qh, stride_qr, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_bb, stride_bh, stride_bn,
        n_keys, q_len, rows, heads, split_len, scale,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // heads).to(tl.int64)  # batch offsets of large caches pass 2**31 elements
        h = bh % heads
        r = tl.arange(0, ROWS)
        d = tl.arange(0, D)
        dv = tl.arange(0, DV)
        row_ok = r < rows
        q = tl.load(Q + b * stride_qb + h * stride_qh + r[:, None] * stride_qr + d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)
        # Row r is (group member r // q_len, new token r % q_len); it may see keys up to its own.
        last_visible = n_keys - q_len + (r % q_len)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DV], tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, n_keys)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            k = tl.load(K + b * stride_kb + h * stride_kh + n[None, :] * stride_kn + d[:, None] * stride_kd,
                        mask=n_ok[None, :], other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            if HAS_BIAS:
                bias = tl.load(Bias + b * stride_bb + h * stride_bh + n * stride_bn, mask=n_ok, other=float("-inf"))
                s += bias[None, :]
            visible = n_ok[None, :] & (n[None, :] <= last_visible[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * stride_vb + h * stride_vh + n[:, None] * stride_vn + dv[None, :] * stride_vd,
                        mask=n_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = (bh * tl.num_programs(1) + split) * ROWS
        tl.store(M_out + out + r, m_i)
        tl.store(L_out + out + r, l_i)
        tl.store(Acc_out + (out + r[:, None]) * DV + dv[None, :], acc)


if triton is not None:

    @triton.jit
    def _combine_kernel(M_in, L_in, Acc_in, Out, splits, heads, groups, q_len, stride_ob, stride_oh, stride_ot,
                        ROWS: tl.constexpr, SPLITS: tl.constexpr, DV: tl.constexpr):
        """Merge the splits of one (row, KV head) program: out = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i,
        stored in the output's dtype at (batch, query head, token)."""
        bh = tl.program_id(0)
        r = tl.program_id(1)
        i = tl.arange(0, SPLITS)
        dv = tl.arange(0, DV)
        ok = i < splits
        base = (bh * splits + i) * ROWS + r
        m = tl.load(M_in + base, mask=ok, other=float("-inf"))
        l = tl.load(L_in + base, mask=ok, other=0.0)
        m_all = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
        acc = tl.load(Acc_in + base[:, None] * DV + dv[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        b = (bh // heads).to(tl.int64)  # batch offsets of large caches pass 2**31 elements
        hq = (bh % heads) * groups + r // q_len
        tl.store(Out + b * stride_ob + hq * stride_oh + (r % q_len) * stride_ot + dv, out.to(Out.dtype.element_ty))


def kernel_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the Triton kernel (:func:`run_kernel`) takes these tensors."""
    dim, dim_v = key.shape[-1], value.shape[-1]
    pow2 = lambda x: x >= 16 and (x & (x - 1)) == 0  # noqa: E731
    return (
        triton is not None
        and query.is_cuda
        and query.shape[2] <= 16
        and query.shape[1] // key.shape[1] * query.shape[2] <= 128
        and pow2(dim)
        and pow2(dim_v)
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def run_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_counts: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = 2,
    target_programs: int = 528,
) -> torch.Tensor:
    """The Triton kernel itself; the caller has checked :func:`kernel_applies`."""
    batch, hq, q_len, dim = query.shape
    heads, n = key.shape[1], key.shape[2]
    dim_v = value.shape[-1]
    groups = hq // heads
    rows = groups * q_len
    rows_pad = max(16, triton.next_power_of_2(rows))
    scale = dim**-0.5 if scale is None else scale
    if block_n is None:
        # Tiles of 64 keys and values of bf16 x 128, two pipeline stages: small enough in shared
        # memory for several programs per SM (results/archive/issue5: timed in a CUDA graph over 32 layers).
        row_bytes = max(dim, dim_v) * query.element_size()
        block_n = 64 if row_bytes <= 256 else 32 if row_bytes <= 512 else 16
    # Rows ordered (group member, new token) so that row r's token is r % q_len.
    q = query.reshape(batch, heads, groups, q_len, dim).reshape(batch, heads, rows, dim)
    if splits is None:
        programs = batch * heads
        splits = max(1, min(math.ceil(n / 256), math.ceil(target_programs / programs)))
    split_len = math.ceil(math.ceil(n / splits) / block_n) * block_n
    splits = math.ceil(n / split_len)
    f32 = dict(device=query.device, dtype=torch.float32)
    m_out = torch.empty(batch * heads, splits, rows_pad, **f32)
    l_out = torch.empty(batch * heads, splits, rows_pad, **f32)
    acc_out = torch.empty(batch * heads, splits, rows_pad, dim_v, **f32)
    if log_counts is not None:
        bias = log_counts.float()
        bias_strides = (bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0, bias.stride(2))
    else:
        bias, bias_strides = m_out, (0, 0, 0)
    _split_kernel[(batch * heads, splits)](
        q, key, value, bias, m_out, l_out, acc_out,
        *q.stride(), *key.stride(), *value.stride(), *bias_strides,
        n, q_len, rows, heads, split_len, scale,
        HAS_BIAS=log_counts is not None, PRECISION="ieee" if query.dtype == torch.float32 else "tf32", ROWS=rows_pad, BLOCK_N=block_n, D=dim, DV=dim_v,
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )
    # Laid out [batch, tokens, heads, dim] (what transformers wants after attention), returned as
    # the [batch, heads, tokens, dim] view: its .transpose(1, 2).contiguous() is then free.
    out = torch.empty(batch, q_len, hq, dim_v, device=query.device, dtype=query.dtype).transpose(1, 2)
    _combine_kernel[(batch * heads, rows)](
        m_out, l_out, acc_out, out, splits, heads, groups, q_len, out.stride(0), out.stride(1), out.stride(2),
        ROWS=rows_pad, SPLITS=triton.next_power_of_2(splits), DV=dim_v,
    )
    return out
