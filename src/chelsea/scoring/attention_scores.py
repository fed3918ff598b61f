"""Attention mass per stored entry: what the attention-ranked baselines (H2O, SnapKV) rank by.

Computed from the queries of one forward over the entries they attend to, with the same
log-count bias and causal rule as :func:`chelsea.attention.weighted_attention`, then summed over
the queries and over the query heads that share each KV head (:func:`attention_mass`), or their
maximum taken (:func:`largest_attention_received`, the scale of the reconstruction scores).
:func:`logit_blocks`, the blocked causal logits underneath, also serves the context-reconstruction
scores of :mod:`chelsea.scoring.reconstruction`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def logit_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    log_counts: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    first: int = 0,
    max_block_bytes: int = 1 << 30,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Attention logits of queries ``first:`` in blocks: ``(start, stop, logits)`` with ``logits``
    ``[batch, kv_heads, groups, stop - start, n]`` float32, each entry's log-count added and the
    entries a query may not see (later ones) at ``-inf``.

    ``query`` ``[batch, heads, q, d]`` are the newest ``q`` entries of ``key`` ``[batch, kv_heads, n, d]``
    and attend causally. A block holds at most ``max_block_bytes`` of logits.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    keys = key.float().transpose(-1, -2)[:, :, None]  # [B, KVH, 1, d, n]
    bias = None if log_counts is None else log_counts.float()[:, :, None, None, :]  # [B, KVH|1, 1, 1, n]
    past = n - q_len
    block = max(1, max_block_bytes // max(1, batch * heads * n * 4))
    for start in range(first, q_len, block):
        stop = min(q_len, start + block)
        q = query[:, :, start:stop].float().reshape(batch, kv_heads, groups, stop - start, dim) * scale
        logits = torch.matmul(q, keys)  # [B, KVH, G, rows, n]; scaling the queries spares a pass over it
        if bias is not None:
            logits += bias
        # Only the entries after the block's first query can be in some row's future.
        rows = torch.arange(start, stop, device=key.device)[:, None]
        cols = torch.arange(start + 1, q_len, device=key.device)[None, :]
        logits[..., past + start + 1 :].masked_fill_(cols > rows, float("-inf"))
        yield start, stop, logits


def probability_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    log_counts: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    first: int = 0,
    max_block_bytes: int = 1 << 30,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Softmax attention of queries ``first:`` in blocks: ``(start, stop, probs)`` with ``probs``
    ``[batch, kv_heads, groups, stop - start, n]`` float32 (:func:`logit_blocks`, then softmax)."""
    past = key.shape[2] - query.shape[2]
    for start, stop, logits in logit_blocks(query, key, log_counts, scale=scale, first=first, max_block_bytes=max_block_bytes):
        # A padding query sees only -inf; it still sees itself, so its row stays finite.
        own = logits.diagonal(offset=past + start, dim1=-2, dim2=-1)
        own.masked_fill_(own.isneginf(), 0.0)
        yield start, stop, logits.softmax(-1)


def _per_key(query, key, log_counts, scale, last, max_block_bytes, largest: bool) -> torch.Tensor:
    """The probabilities of the (last ``last``) queries reduced per key over queries and the
    query heads of each KV head: summed, or their maximum (``largest``)."""
    q_len = query.shape[2]
    first = 0 if last is None else max(0, q_len - last)
    out = torch.zeros(key.shape[0], key.shape[1], key.shape[2], dtype=torch.float32, device=key.device)
    for _, _, probs in probability_blocks(query, key, log_counts, scale=scale, first=first, max_block_bytes=max_block_bytes):
        if largest:
            torch.maximum(out, probs.amax(dim=(2, 3)), out=out)
        else:
            out += probs.sum(dim=(2, 3))
    return out


def attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    log_counts: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    last: int | None = None,
    max_block_bytes: int = 1 << 30,
) -> torch.Tensor:
    """Softmax attention of the (last ``last``) queries summed per key, ``[batch, kv_heads, n]`` float32.

    ``query`` ``[batch, heads, q, d]`` are the newest ``q`` entries of ``key`` ``[batch, kv_heads, n, d]``
    and attend causally. Queries are processed in blocks so no more than ``max_block_bytes`` of
    probabilities exist at once.
    """
    return _per_key(query, key, log_counts, scale, last, max_block_bytes, largest=False)


def largest_attention_received(
    query: torch.Tensor,
    key: torch.Tensor,
    log_counts: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    last: int | None = None,
    max_block_bytes: int = 1 << 30,
) -> torch.Tensor:
    """The largest softmax attention each key receives from the (last ``last``) queries of any
    query head reading its KV head, ``[batch, kv_heads, n]`` float32 (0 where no query sees it).

    Same inputs as :func:`attention_mass`; a probability, like the context-reconstruction scores
    of :mod:`chelsea.scoring.reconstruction`, so the two can be compared and combined by their maximum.
    """
    return _per_key(query, key, log_counts, scale, last, max_block_bytes, largest=True)


def last_query_normalisers(
    query: torch.Tensor,
    key: torch.Tensor,
    log_counts: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    last: int,
    max_block_bytes: int = 1 << 30,
) -> torch.Tensor:
    """The log-normaliser (log-sum-exp of the logits over every entry a query sees) of the last
    ``last`` queries, ``[batch, heads, last]`` float32; inputs as :func:`attention_mass`."""
    batch, heads, q_len, _ = query.shape
    parts = [logits.logsumexp(-1) for _, _, logits in logit_blocks(query, key, log_counts, scale=scale,
                                                                    first=max(0, q_len - last), max_block_bytes=max_block_bytes)]
    return torch.cat(parts, dim=-1).reshape(batch, heads, -1)
