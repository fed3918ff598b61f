"""Uneven budgets over layers from importance scores (KVzip's global ranking, AdaKV's floor).

Every KV head of a layer keeps the same number of entries (the layer stays one dense tensor, so
its bytes are really freed); layers differ. The entries outside sinks and window of all layers are
ranked together; each layer's share of the region budget follows how many of the top-ranked
entries it holds, never below ``floor`` of an even split. :func:`profile_shares` does the same
from score distributions measured once on calibration prompts (``chelsea``'s
``layer_budgets="calibrated"``), so the layers need no scores of their own from this context.
"""

from __future__ import annotations

import math

import torch


def split_budgets(cache, floor: float, even: frozenset[int] = frozenset(), profile: torch.Tensor | None = None) -> None:
    """Give each layer of ``cache`` (prefilled, not yet compressed, unless split by ``profile``) its share of the budget beyond
    sinks and window (``layer.share``, relative to an even split), by the scores of all layers
    ranked together (:func:`layer_shares`); the layers whose indices are in ``even`` (scored
    otherwise than the rest, so not comparable) keep an even share and the others split theirs.
    ``profile`` ``[layers, points]`` (calibrated score quantiles) splits it by those instead, over
    every layer (:func:`profile_shares`). Padded batches and single layers keep even shares."""
    layers = [layer for layer in cache.layers if layer.is_initialized]
    if len(layers) <= 1 or any(layer.has_padding for layer in layers):
        return
    cfg = cache.config
    seen = layers[0].seen
    keep = cfg.budget(seen) - cfg.sink_tokens - cfg.window
    if keep <= 0:
        return
    if profile is not None and len(profile) == len(layers):  # needs no scores, so also a compressed cache
        ranked, shares = layers, profile_shares(profile, keep, seen - cfg.sink_tokens - cfg.window, floor)
    elif any(layer.length != seen for layer in layers):  # ranking scores needs every entry uncompressed
        return
    else:
        ranked = [layer for i, layer in enumerate(cache.layers) if layer.is_initialized and i not in even]
        regions = [layer.scores[:, :, cfg.sink_tokens : layer.length - cfg.window] for layer in ranked]
        shares = layer_shares(regions, keep, floor)
    for layer, share in zip(ranked, shares):
        layer.share = share / keep


def layer_shares(region_scores: list[torch.Tensor], keep: int, floor: float = 0.2) -> list[int]:
    """Entries per KV head each layer keeps from its region, summing to ``keep * layers``.

    Args:
        region_scores: per layer, the importance of the entries between sinks and window,
            ``[batch, kv_heads, n_l]`` (layers may differ in length and head count).
        keep: region entries per KV head a layer would keep with an even split.
        floor: the least any layer gets, as a fraction of ``keep``.

    The global threshold is taken per batch row (rows rank their own entries); a layer's count is
    averaged over rows, because one layer holds one length for all its rows.
    """
    layers = len(region_scores)
    if layers == 0 or keep <= 0:
        return [max(0, keep)] * layers
    caps = [s.shape[-1] for s in region_scores]
    total = keep * layers
    if total >= sum(caps):
        return caps
    heads = [s.shape[1] for s in region_scores]
    flats = [s.float().flatten(1) for s in region_scores]  # [batch, the layer's entries]
    flat = torch.cat(flats, dim=1)
    slots = sum(keep * h for h in heads)
    threshold = flat.topk(min(slots, flat.shape[1]), dim=1).values[:, -1:]  # [batch, 1]
    counts = torch.stack([(f >= threshold).sum(1).float().mean() for f in flats]).tolist()  # one read from the device
    return _split([c / h for c, h in zip(counts, heads)], keep, caps, floor)


def profile_shares(profiles: torch.Tensor, keep: int, length: int, floor: float = 0.2) -> list[int]:
    """:func:`layer_shares` from calibrated score distributions instead of this context's scores.

    ``profiles`` ``[layers, points]``: per layer, its region scores' quantiles on calibration
    prompts, largest first (:func:`score_profile`); ``length``: region entries per KV head now.
    Each quantile stands for ``1 / points`` of its layer's entries; the threshold that keeps
    ``keep / length`` of them over all layers gives each layer its wanted share, split as
    :func:`layer_shares` splits it."""
    layers, points = profiles.shape
    if layers == 0 or keep <= 0:
        return [max(0, keep)] * layers
    if keep >= length:
        return [length] * layers
    flat = profiles.float().flatten()
    threshold = flat.topk(max(1, round(keep / length * flat.numel()))).values[-1]
    wanted = ((profiles.float() >= threshold).sum(1).float() / points * length).tolist()
    return _split(wanted, keep, [length] * layers, floor)


def score_profile(region: torch.Tensor, points: int = 256) -> torch.Tensor:
    """``[points]``: quantiles of a layer's region scores ``[rows, kv_heads, n]`` (all rows and
    heads pooled), largest first; what :func:`profile_shares` ranks."""
    values = region.float().flatten().sort(descending=True).values
    at = torch.linspace(0, values.numel() - 1, points, device=values.device).round().long()
    return values[at]


def _split(wanted: list[float], keep: int, caps: list[int], floor: float) -> list[int]:
    """Entries per KV head for each layer from the entries it ``wanted``: at least ``floor *
    keep``, at most its cap, the rest in proportion to what it wanted beyond the floor, summing
    to ``keep * layers`` (or every cap)."""
    layers = len(wanted)
    total = keep * layers
    if total >= sum(caps):
        return list(caps)
    least = math.ceil(floor * keep)
    spare = total - least * layers
    weight = [max(0.0, w - least) for w in wanted]
    scale = spare / sum(weight) if sum(weight) > 0 else 0.0
    shares = [min(cap, least + int(w * scale)) if scale else min(cap, keep) for w, cap in zip(weight, caps)]
    # Hand what rounding and caps left over to the layers with room, most wanted first.
    left = total - sum(shares)
    for i in sorted(range(layers), key=lambda i: -wanted[i]):
        if left <= 0:
            break
        extra = min(left, caps[i] - shares[i])
        shares[i] += extra
        left -= extra
    return shares
