"""Attention over a clustered cache: each stored entry's log-count is added to its logit.

A centroid that stands for ``n`` tokens gets ``log n`` added to its attention logit (Token Merging's
"proportional attention"), so ``exp(s + log n) = n * exp(s)``: a cluster of ``n`` identical tokens
gives exactly the attention output of those ``n`` tokens. Padding entries carry log-count ``-inf``.

:func:`weighted_attention` is the exact PyTorch path (scaled-dot-product attention with an additive
bias; while no entry carries a count, the fused causal kernel without a mask), usable on CPU and
GPU; on CUDA, decoding (up to 16 new tokens) runs the Triton kernel of :mod:`chelsea.kernels`
instead, which gives the same results. :func:`register` plugs it into transformers under the name
``"chelsea"``, both as an attention function and as a mask function, so ``model.generate`` runs
unchanged once ``model.set_attn_implementation("chelsea")`` has been called.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .kernels import kernel_applies, run_kernel

ATTN_IMPLEMENTATION = "chelsea"


def weighted_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_counts: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over stored entries weighted by their counts.

    Args:
        query: ``[batch, heads, q, head_dim]``; its ``q`` tokens are the last ``q`` entries of
            ``key``/``value`` and attend causally among themselves (each always sees itself).
        key, value: ``[batch, kv_heads, n, head_dim]``; ``heads`` must be a multiple of ``kv_heads``
            (query head ``h`` reads KV head ``h // (heads // kv_heads)``, as in transformers).
        log_counts: ``[batch, kv_heads or 1, n]`` float, log of the tokens each entry stands for;
            ``-inf`` hides an entry (padding). ``None`` means every entry is one real token.
        scale: logit scale, ``head_dim ** -0.5`` by default.

    Returns:
        ``[batch, heads, q, head_dim_v]``.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads")
    if q_len > n:
        raise ValueError(f"{q_len} queries but only {n} keys: the queries' own keys must be included")
    groups = heads // kv_heads

    if query.is_cuda and kernel_applies(query, key, value):
        return run_kernel(query, key, value, log_counts, scale=scale)

    if q_len == 1:
        # Decoding: fold the query heads of a group into the query axis, so each KV head is read
        # once and no copy of the cache is made for grouped-query attention.
        bias = None if log_counts is None else log_counts[:, :, None, :].to(query.dtype)
        folded = query.reshape(batch, kv_heads, groups, head_dim)
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=bias, scale=scale)
        return out.reshape(batch, heads, 1, -1)

    if log_counts is None:
        # Causal aligned to the last key: a fused kernel that builds no mask, also when past > 0.
        mask = None if q_len == n else causal_lower_right(q_len, n)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=q_len == n, scale=scale,
                                              enable_gqa=groups > 1)

    past = n - q_len
    rows = torch.arange(q_len, device=query.device)[:, None]
    cols = torch.arange(n, device=query.device)[None, :] - past
    causal = torch.zeros(q_len, n, device=query.device, dtype=torch.float32)
    causal = causal.masked_fill(cols > rows, float("-inf"))
    bias = log_counts.float()[:, :, None, :] + causal
    # A padding query still sees itself, so its (unused) output stays finite instead of NaN.
    bias = bias.masked_fill((cols == rows)[None, None] & bias.isneginf(), 0.0)
    if bias.shape[1] > 1 and groups > 1:
        bias = bias.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias.to(query.dtype), scale=scale, enable_gqa=groups > 1
    )
    return out


def causal_attention_with_normaliser(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention (aligned to the last key, every entry one token) and each query's
    log-normaliser, ``(out [batch, heads, q, d], lse [batch, heads, q] float32)``, from PyTorch's
    flash kernel, which computes the log-sum-exp anyway; ``None`` where that kernel does not take
    the tensors (CPU, float32, a head size it lacks, flash attention switched off).

    The context-reconstruction scores (:mod:`chelsea.scoring.reconstruction`) need exactly this normaliser:
    taking it here saves a second pass over the keys."""
    q_len, n, dim = query.shape[2], key.shape[2], query.shape[-1]
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and key.dtype == query.dtype
            and value.dtype == query.dtype and dim % 8 == 0 and dim <= 256 and value.shape[-1] == dim
            and q_len <= n and torch.backends.cuda.flash_sdp_enabled()):
        return None
    try:
        # The flash op's causal mask is aligned to the last key (lower right), as the repeat needs.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, is_causal=True, return_debug_mask=False,
            scale=dim ** -0.5 if scale is None else scale)[:2]
    except RuntimeError:  # a GPU or build without this kernel
        return None
    return out, lse[..., :q_len]


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_counts: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    **tuning,
) -> torch.Tensor:
    """Weighted attention of a few new tokens, ``query`` ``[B, Hq, q, D]``, over ``key``/``value``
    ``[B, H, n, D]`` with ``log_counts`` ``[B, H or 1, n]``. Returns ``[B, Hq, q, Dv]``.

    The Triton kernel where :func:`chelsea.kernels.kernel_applies`, with ``tuning`` passed to
    :func:`chelsea.kernels.run_kernel` (``splits``, ``block_n``, ``num_warps``, ``num_stages``,
    ``target_programs``); elsewhere :func:`weighted_attention`. For the kernel benchmarks and sweeps.
    """
    if not kernel_applies(query, key, value):
        return weighted_attention(query, key, value, log_counts, scale=scale)
    return run_kernel(query, key, value, log_counts, scale=scale, **tuning)


@torch.compiler.disable  # the cache layer's attend() clusters on the host; see ClusteredCache.update
def chelsea_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: the cache layer that returned ``key`` attends, if any.

    The keys returned by the layers of :class:`chelsea.cache.ClusteredCache` carry a reference to
    their layer, whose ``attend`` knows how its entries are weighted (log-counts, or ClusterGen's
    estimators). With any other cache (or none) every key is one token and only padding is masked.
    ``attention_mask`` is the 2D padding mask handed through by :func:`chelsea_mask`.
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "the 'chelsea' attention takes a 2D padding mask [batch, tokens]; custom 4D attention masks are not supported"
        )
    q_len, n = query.shape[2], key.shape[2]
    layer = getattr(key, "_chelsea_layer", None)
    if layer is not None:
        new_valid = None if attention_mask is None else attention_mask[:, -q_len:].to(key.device)
        out = layer.attend(query, key, value, new_valid, scaling, module)
    else:
        log_counts = None
        if attention_mask is not None:
            valid = attention_mask[:, -n:].to(key.device)
            log_counts = torch.zeros(valid.shape, device=key.device).masked_fill(~valid, float("-inf"))[:, None]
        out = weighted_attention(query, key, value, log_counts, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def chelsea_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask function: pass the 2D padding mask through (``None`` when nothing is padded).

    Causality and the per-entry weights are applied in the attention function itself, because
    after clustering the stored entries no longer line up one-to-one with token positions.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def register() -> str:
    """Register the ``"chelsea"`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, chelsea_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, chelsea_mask)
    return ATTN_IMPLEMENTATION
