"""Fitted merges: a merged entry's value and log-count chosen to reproduce the full cache's attention.

A merged entry stands for a cluster ``C`` of entries (its representative and the members that
joined it). For a query ``q`` the full cache gives that cluster the attention mass
``S_q = sum_{j in C} p_qj`` (``p_qj``: ``q``'s softmax probability of entry ``j``, the log-counts
included) and the output share ``N_q = sum_{j in C} p_qj v_j``. The merged entry, key ``k`` (the
count-weighted centroid), log-count ``b`` and value ``v``, gives ``a_q e^b`` and ``a_q e^b v`` with
``a_q = exp(scale q.k - lse_q)`` (``lse_q``: the query's log-normaliser over the full cache).

Least squares over a set of reference queries (the prompt's last queries, which the scoring
already computes), one cluster at a time, has a closed form:

- mass: ``e^b = sum_q a_q S_q / sum_q a_q^2`` (positive: a non-negative mass, no extra bytes);
- value: ``v = sum_j u_j v_j / sum_j u_j`` with ``u_j = sum_q a_q p_qj``, a weighted mean of the
  members' values where each member weighs as much as the reference queries read it, scaled by
  how much they read the merged key. The count-weighted centroid is the same formula with
  ``u_j`` = the member's count.

When the members are identical tokens, ``p_qj = a_q e^{c_j}`` for every query, so the fit gives back
the total count and the common value: the merge stays exact. The sums over the queries run in
chunks so memory stays bounded; a cluster whose members no reference query reads at all (every
``u_j`` below float32's range) cannot be fitted and keeps the centroid's value and log-count.
:func:`fitted_merge_terms` gives ``u_j`` and ``sum_q a_q^2`` per region entry; :mod:`.chelsea`
pools them per cluster.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

CHUNK_ELEMENTS = 1 << 24  # (query, entry) logits computed at once (float32: 64 MiB per product)


class ReferenceQueries(NamedTuple):
    """The queries a fit reproduces the attention of: ``queries`` ``[batch, heads, m, d]`` (after
    rotary embedding, like the stored keys), their log-normaliser over the whole cache they
    attended to, ``lse`` ``[batch, heads, m]`` float32, and the attention ``scale``."""

    queries: torch.Tensor
    lse: torch.Tensor
    scale: float

    def grouped(self, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, kv_heads, groups * m, d], [B, kv_heads, groups * m])``: each KV head's queries."""
        batch, heads, m, dim = self.queries.shape
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads do not share {kv_heads} KV heads evenly")
        groups = heads // kv_heads
        return (self.queries.reshape(batch, kv_heads, groups * m, dim),
                self.lse.reshape(batch, kv_heads, groups * m))


def concat_references(refs: list[ReferenceQueries | None]) -> ReferenceQueries | None:
    """The references of several layers' rows stacked along the batch (``None`` when any layer has
    none). The layers come from one compression batch, which only joins references of one shape."""
    if not refs or any(r is None for r in refs):
        return None
    if len(refs) == 1:
        return refs[0]
    return ReferenceQueries(torch.cat([r.queries for r in refs]), torch.cat([r.lse for r in refs]), refs[0].scale)


@functools.cache
def _float32_results(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm`` gives float32 results of ``dtype`` inputs on ``device`` (``out_dtype``:
    CUDA, PyTorch 2.8 and later)."""
    try:
        x = torch.zeros(1, 1, 1, device=device, dtype=dtype)
        return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _products(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k.T`` in float32 for ``q`` ``[B, H, m, d]`` and ``k`` ``[B, H, c, d]``.

    On CUDA, half-precision inputs multiply on the tensor cores with a float32 result (the products
    of two bf16 numbers and their float32 sums are what a float32 product gives, up to the order
    of the sums); elsewhere (or where PyTorch cannot) both sides are cast to float32 first."""
    if (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and _float32_results(q.device, q.dtype)):
        batch, heads, m, d = q.shape
        out = torch.bmm(q.reshape(batch * heads, m, d), k.reshape(batch * heads, -1, d).transpose(1, 2), out_dtype=torch.float32)
        return out.view(batch, heads, m, -1)
    return q.float() @ k.float().transpose(-1, -2)


def fitted_merge_terms(
    keys: torch.Tensor,
    log_counts: torch.Tensor,
    merged_keys: torch.Tensor,
    dest: torch.Tensor,
    refs: ReferenceQueries,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, a2)`` over the region's entries ``[B, H, n]`` float32.

    ``keys``, ``log_counts``: the entries before merging; ``merged_keys``: the keys the merged
    entries will have, at their representatives' positions; ``dest``: the position of each entry's
    cluster (its representative's, or its own). ``u[j]`` is ``sum_q a_{q,dest(j)} p_qj``;
    ``a2[r]`` is ``sum_q a_{q,r}^2`` for the merged key at position ``r``.

    The entries run in chunks, every query at once: each key is read once (chunks of queries
    would read all keys again per chunk, which dominated the fit's time at long contexts).
    ``block``: every cluster lies within one block of that many consecutive entries (as
    :func:`~chelsea.methods.merge_by_importance` clusters); chunks are then whole blocks and the
    cluster keys' weights are taken from the chunk's own, one product fewer.
    """
    batch, heads, n, _ = keys.shape
    queries, lse = refs.grouped(heads)
    total = queries.shape[2]
    u = torch.zeros(batch, heads, n, device=keys.device)
    a2 = torch.zeros_like(u)
    if total and n:
        shift = lse.float()[..., None] / refs.scale  # [B, H, m, 1]: logits are scaled after the shift
        step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * total))
        if block:
            step = max(block, step - step % block)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            at = dest[:, :, lo:hi]
            own = _products(queries, merged_keys[:, :, lo:hi]).sub_(shift).mul_(refs.scale).exp_()  # [B, H, m, chunk]
            if block:
                a = own.gather(-1, (at - lo)[:, :, None].expand_as(own))
            else:
                rep = merged_keys.gather(2, at[..., None].expand(-1, -1, -1, keys.shape[3]))  # each entry's cluster key
                a = _products(queries, rep).sub_(shift).mul_(refs.scale).exp_()
            p = _products(queries, keys[:, :, lo:hi]).sub_(shift).mul_(refs.scale).add_(log_counts[:, :, None, lo:hi].float()).exp_()
            u[:, :, lo:hi] = p.mul_(a).sum(2)
            a2[:, :, lo:hi] = own.square_().sum(2)
    return u, a2
