"""Triton kernels for one merge step of Chelsea's chunked soft matching.

A merge step (:func:`chelsea.methods.chelsea.soft_matching_step`) has a part that needs the whole
region (choosing the ``r`` most similar edges: one ``topk``) and two parts that stay inside a
chunk, because every A entry is matched to a B entry of its own chunk:

- :func:`best_edges`: each A entry's best cosine similarity to a B entry of its chunk, and where
  that B entry is. One program per (chunk, row, head) reads the chunk's keys once and computes
  the chunk's similarities with one small float32 matrix product.
- :func:`merge_chosen`: given the chosen A entries as flags, a small scan finds where each
  chunk's kept entries start in the shrunk output; then each program builds its chunk's
  count-weighted membership matrix, multiplies it with the chunk's keys and values (the
  centroids, in float32) and writes the kept entries straight to their places, with the
  centroids' log-counts.

In PyTorch the same step is about sixty launches with float32 copies of the region, gathers and
scatters; here it is three kernels and a few small ops, reading the keys (and values) once and
writing the output once. At batch 1 the step is bound by the host's launches, so their number
matters as much as the bytes.

Entries that nothing merged into are copied exactly. On the CPU, or where :func:`kernel_applies`
says no, the PyTorch functions in :mod:`chelsea.methods.chelsea` run; the kernels give their results
up to float32 rounding (tested on the GPU machine).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None


if triton is not None:
    # Lengths and the strides that follow them change with every step and prompt; left
    # unspecialised, one compiled kernel serves them all (no compile inside a timed prefill).
    _VARYING = ["length", "chunks", "stride_kb", "stride_kh", "stride_vb", "stride_vh", "stride_cb", "stride_ch",
                "stride_rb", "stride_rh", "stride_pb", "stride_ph", "stride_ob", "stride_oh",
                "stride_kob", "stride_koh", "stride_vob", "stride_voh", "stride_cob", "stride_coh"]

    def _jit(fn):
        names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        return triton.jit(fn, do_not_specialize=[n for n in names if n in _VARYING])

    @triton.jit
    def _chunk(heads, length, C: tl.constexpr):
        """This program's chunk, batch row and head, its entries' offsets, positions and validity."""
        chunk = tl.program_id(0)
        bh = tl.program_id(1)
        i = tl.arange(0, C)
        pos = chunk * C + i
        return chunk, (bh // heads).to(tl.int64), bh % heads, i, pos, pos < length  # int64: large offsets

    @triton.jit
    def _rows(X, base, pos, ok, stride_n, stride_d, dim, D: tl.constexpr):
        """Entries ``pos`` of one (row, head) of ``X`` as float32 ``[len(pos), D]``, 0 where masked."""
        d = tl.arange(0, D)
        return tl.load(X + base + pos[:, None] * stride_n + d[None, :] * stride_d,
                       mask=ok[:, None] & (d[None, :] < dim), other=0.0).to(tl.float32)

    @_jit
    def _best_edges_kernel(
        K, Sim, Pos,
        stride_kb, stride_kh, stride_kn, stride_kd, stride_ob, stride_oh,
        heads, length, dim,
        C: tl.constexpr, D: tl.constexpr,
    ):
        chunk, b, h, i, pos, ok = _chunk(heads, length, C)
        xf = _rows(K, b * stride_kb + h * stride_kh, pos, ok, stride_kn, stride_kd, dim, D)
        norm = tl.maximum(tl.sqrt(tl.sum(xf * xf, 1)), 1e-12)
        s = tl.dot(xf, tl.trans(xf), input_precision="ieee") / (norm[:, None] * norm[None, :])
        s = tl.where(((i % 2 == 0) & ok)[None, :], s, float("-inf"))  # columns: the chunk's B entries
        best = tl.max(s, 1)
        arg = tl.argmax(s, 1)
        out = b * stride_ob + h * stride_oh + chunk * (C // 2) + i // 2
        row_ok = (i % 2 == 1) & ok  # rows: the chunk's A entries
        tl.store(Sim + out, best, mask=row_ok)
        tl.store(Pos + out, (chunk * C + arg).to(tl.int64), mask=row_ok)

    @_jit
    def _offsets_kernel(Removed, Off, stride_rb, stride_rh, stride_ob, stride_oh, heads, chunks,
                        C: tl.constexpr, BLOCK: tl.constexpr):
        """Where each chunk's first kept entry goes: chunk * C minus the entries removed before it."""
        bh = tl.program_id(0)
        b = (bh // heads).to(tl.int64)  # batch offsets of large caches pass 2**31 elements
        h = bh % heads
        carry = tl.full([], 0, tl.int32)
        for start in range(0, chunks, BLOCK):
            chunk = start + tl.arange(0, BLOCK)
            slot = chunk[:, None] * (C // 2) + tl.arange(0, C // 2)[None, :]
            flags = tl.load(Removed + b * stride_rb + h * stride_rh + slot, mask=(chunk < chunks)[:, None], other=0)
            removed = tl.sum(flags.to(tl.int32), 1)
            before = tl.cumsum(removed, 0) - removed + carry
            tl.store(Off + b * stride_ob + h * stride_oh + chunk, chunk * C - before, mask=chunk < chunks)
            carry += tl.sum(removed, 0)

    @_jit
    def _merge_kernel(
        K, V, LC, Removed, BPos, Off, K_out, V_out, LC_out,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_cb, stride_ch, stride_cn,
        stride_rb, stride_rh, stride_pb, stride_ph, stride_ob, stride_oh,
        stride_kob, stride_koh, stride_kon, stride_kod,
        stride_vob, stride_voh, stride_von, stride_vod,
        stride_cob, stride_coh, stride_con,
        heads, length, dim, dim_v,
        C: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    ):
        chunk, b, h, i, pos, ok = _chunk(heads, length, C)
        # An A entry (odd offset) that was chosen joins its best B entry; every other entry stays.
        is_a = (i % 2 == 1) & ok
        slot = chunk * (C // 2) + i // 2
        chosen = tl.load(Removed + b * stride_rb + h * stride_rh + slot, mask=is_a, other=0) != 0
        best = tl.load(BPos + b * stride_pb + h * stride_ph + slot, mask=is_a, other=0).to(tl.int32) - chunk * C
        target = tl.where(chosen, best, tl.where(ok, i, -1))
        lc = tl.load(LC + b * stride_cb + h * stride_ch + pos * stride_cn, mask=ok, other=float("-inf"))
        member = target[None, :] == i[:, None]  # [centroid row, entry]: the entry joins that row
        weights = tl.where(member, tl.exp(lc)[None, :], 0.0)
        total = tl.sum(weights, 1)
        merged = tl.sum(member.to(tl.int32), 1) > 1
        kept = ok & (target == i)
        dest = tl.load(Off + b * stride_ob + h * stride_oh + chunk) + tl.cumsum(kept.to(tl.int32), 0) - 1

        d = tl.arange(0, D)
        x = _rows(K, b * stride_kb + h * stride_kh, pos, ok, stride_kn, stride_kd, dim, D)
        y = tl.where(merged[:, None], tl.dot(weights, x, input_precision="ieee") / total[:, None], x)
        tl.store(K_out + b * stride_kob + h * stride_koh + dest[:, None] * stride_kon + d[None, :] * stride_kod,
                 y.to(K_out.dtype.element_ty), mask=kept[:, None] & (d[None, :] < dim))

        dv = tl.arange(0, DV)
        x = _rows(V, b * stride_vb + h * stride_vh, pos, ok, stride_vn, stride_vd, dim_v, DV)
        y = tl.where(merged[:, None], tl.dot(weights, x, input_precision="ieee") / total[:, None], x)
        tl.store(V_out + b * stride_vob + h * stride_voh + dest[:, None] * stride_von + dv[None, :] * stride_vod,
                 y.to(V_out.dtype.element_ty), mask=kept[:, None] & (dv[None, :] < dim_v))

        lc_out = tl.where(merged, tl.log(total), lc)
        tl.store(LC_out + b * stride_cob + h * stride_coh + dest * stride_con, lc_out, mask=kept)


def kernel_applies(keys: torch.Tensor, values: torch.Tensor, log_counts: torch.Tensor, chunk_size: int) -> bool:
    """Whether :func:`best_edges` and :func:`merge_chosen` run on the GPU for these tensors: CUDA
    tensors with Triton installed, keys and values in bf16, fp16 or fp32 with head sizes up to 256,
    float32 log-counts, and a chunk size that is a power of two from 16 to 64."""
    return (
        triton is not None
        and keys.is_cuda
        and chunk_size in (16, 32, 64)
        and keys.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and values.dtype == keys.dtype
        and log_counts.dtype == torch.float32
        and keys.shape[-1] <= 256
        and values.shape[-1] <= 256
    )


def _chunks(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size)


def best_edges(keys: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every A entry's best cosine similarity to a B entry of its chunk (float32) and that B
    entry's position (long), ``[batch, heads, A entries]``, A entries in sequence order (a trailing
    partial chunk has its own A/B split)."""
    batch, heads, length, dim = keys.shape
    chunks = _chunks(length, chunk_size)
    a_entries = length // chunk_size * (chunk_size // 2) + length % chunk_size // 2
    sims = keys.new_empty((batch, heads, chunks * (chunk_size // 2)), dtype=torch.float32)
    pos = torch.empty(sims.shape, dtype=torch.long, device=keys.device)
    if chunks and batch * heads:
        _best_edges_kernel[(chunks, batch * heads)](
            keys, sims, pos, *keys.stride(), sims.stride(0), sims.stride(1),
            heads, length, dim,
            C=chunk_size, D=max(16, triton.next_power_of_2(dim)),
        )
    # A trailing partial chunk leaves its slots past the last A entry unwritten: they are the last ones.
    return sims[..., :a_entries], pos[..., :a_entries]


def merge_chosen(
    keys: torch.Tensor,
    values: torch.Tensor,
    log_counts: torch.Tensor,
    b_pos: torch.Tensor,
    chosen: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the ``chosen`` A entries (indices into :func:`best_edges`' A entries, ``[batch, heads,
    r]``) into their best B entries ``b_pos``; returns the keys, values and log-counts of the
    ``length - r`` entries left, in order."""
    batch, heads, length, dim = keys.shape
    chunks = _chunks(length, chunk_size)
    device = keys.device
    removed = torch.zeros(batch, heads, chunks * (chunk_size // 2), dtype=torch.int8, device=device)
    removed.scatter_(-1, chosen, 1)
    offsets = torch.empty(batch, heads, chunks, dtype=torch.int32, device=device)
    out_len = length - chosen.shape[-1]
    k_out = keys.new_empty((batch, heads, out_len, dim))
    v_out = values.new_empty((batch, heads, out_len, values.shape[-1]))
    lc_out = log_counts.new_empty((batch, heads, out_len))
    if chunks and batch * heads:
        _offsets_kernel[(batch * heads,)](
            removed, offsets, removed.stride(0), removed.stride(1), offsets.stride(0), offsets.stride(1), heads, chunks,
            C=chunk_size, BLOCK=1024,  # fixed: a block size per prompt length would mean a compile per length
        )
        _merge_kernel[(chunks, batch * heads)](
            keys, values, log_counts, removed, b_pos, offsets, k_out, v_out, lc_out,
            *keys.stride(), *values.stride(), *log_counts.stride(),
            removed.stride(0), removed.stride(1), b_pos.stride(0), b_pos.stride(1), offsets.stride(0), offsets.stride(1),
            *k_out.stride(), *v_out.stride(), *lc_out.stride(),
            heads, length, dim, values.shape[-1],
            C=chunk_size, D=max(16, triton.next_power_of_2(dim)), DV=max(16, triton.next_power_of_2(values.shape[-1])),
        )
    return k_out, v_out, lc_out
