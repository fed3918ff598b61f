"""Fact heads: the few KV heads whose reconstruction scores single out exact content, lent to every layer.

Context reconstruction (:mod:`.reconstruction`) scores each layer on its own, and in most
layers of a small model a code's digits are not among the entries that score highest: at 2K tokens
and 80% removed, Qwen2.5-Coder-0.5B's floor layers kept 0-20% of a planted number's digits, while
ranking the facts first (an oracle) lifted the eval from about 60 to 97 (``results/archive/issue14``). A
few (layer, KV head) pairs do rank such tokens near the top. ``chelsea`` finds them once per model
by calibration and lends their verdict to every layer: after the layer budgets are split by the
layers' own scores, each layer ranks its region (between sinks and window) by

    own percentile + fact_weight * the token's mean percentile over the fact heads

so a token the fact heads agree on is kept (and, being ranked high, kept exact) in every layer.

Calibration (:func:`find_fact_heads`) plants random codes of capitals and digits, in sentences
unlike the eval tasks', in the packaged essays (:mod:`.calibration`), scores the prompts by
reconstruction and takes the heads that put the most of the codes' tokens in their top 10%
(:func:`choose_heads`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..compat import cache_arg
from ..errors import ChelseaError
from .budgets import score_profile
from .calibration import CALIBRATION_LENGTH, CODES_PER_PROMPT, calibration_prompts
from .reconstruction import VIEWS, score_by_reconstruction
from .store import stored_path

CALIBRATION_VERSION = 3  # raise when the calibration changes, so stored fact heads are not reused
TOP_SHARE = 0.1  # a head "finds" a token when it is within the top 10% of the head's region
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FactHeads:
    """The chosen ``(cache layer, KV head)`` pairs, best first, and each one's calibration hit rate
    (the share of the planted codes' tokens inside its top :data:`TOP_SHARE`). ``profile``: per
    cache layer, the quantiles of its reconstruction scores on the calibration prompts, largest
    first (:func:`chelsea.scoring.budgets.score_profile`), from which ``layer_budgets=
    "calibrated"`` splits the budget over layers without scoring them again."""

    heads: tuple[tuple[int, int], ...]
    hit_rate: tuple[float, ...]
    profile: tuple[tuple[float, ...], ...] = ()


def _percentiles(region: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within the last dimension as a fraction in [0, 1)."""
    return region.float().argsort(-1).argsort(-1).float() / region.shape[-1]


def head_hits(scores: list[torch.Tensor], positions: list[list[int]], lo: int, window: int) -> torch.Tensor:
    """``[layers, kv_heads]``: per (layer, KV head) of ``scores`` (per layer ``[prompts, kv_heads,
    n]``), the share of ``positions`` inside region ``[lo, n - window)`` whose score is within the
    head's top :data:`TOP_SHARE` of that region, averaged over prompts."""
    out = []
    for layer in scores:
        region = layer[:, :, lo : layer.shape[-1] - window].float()
        k = max(1, int(TOP_SHARE * region.shape[-1]))
        threshold = region.topk(k, dim=-1).values[..., -1:]
        hits = []
        for row, pos in enumerate(positions):
            inside = torch.tensor([p - lo for p in pos if lo <= p < layer.shape[-1] - window], dtype=torch.long)
            if inside.numel() == 0:
                raise ChelseaError("no calibration code lies between the sinks and the window")
            hits.append((region[row][:, inside] >= threshold[row]).float().mean(-1))
        out.append(torch.stack(hits).mean(0))
    return torch.stack(out)


def choose_heads(hits: torch.Tensor, count: int) -> FactHeads:
    """The ``count`` (layer, KV head) pairs of ``hits`` ``[layers, kv_heads]`` with the highest rate
    (every pair of a model that has fewer)."""
    if count < 1:
        raise ChelseaError(f"fact_heads must be at least 1; got {count}")
    best = hits.flatten().topk(min(count, hits.numel()))
    kv = hits.shape[1]
    return FactHeads(tuple((int(i) // kv, int(i) % kv) for i in best.indices), tuple(float(v) for v in best.values))


def consensus(scores: list[torch.Tensor], heads: FactHeads, lo: int, window: int) -> torch.Tensor:
    """``[batch, n_region]``: each region entry's mean percentile over the fact heads, from the
    per-layer scores ``[batch, kv_heads, n]`` (all layers hold the same ``n`` entries)."""
    regions = torch.stack([scores[layer][:, head, lo : scores[layer].shape[-1] - window] for layer, head in heads.heads])
    return _percentiles(regions).mean(0)


def lend_ranks(region: torch.Tensor, agreed: torch.Tensor, weight: float) -> torch.Tensor:
    """A layer's new region scores ``[batch, kv_heads, m]`` (or several layers' stacked,
    ``[layers, batch, kv_heads, m]``): its own percentile per (row, head) plus ``weight`` times
    the fact heads' ``agreed`` percentile ``[batch, m]``."""
    return _percentiles(region) + weight * agreed[:, None, :].to(region.device)


def fact_settings(cache) -> tuple:
    """The settings the fact heads of ``cache``'s method depend on (the calibration's key)."""
    cfg, imp = cache.config, cache.method.scoring
    view = imp.importance if imp.importance in VIEWS else "local"
    return (imp.output_norm, cfg.sink_tokens, cfg.window, imp.fact_heads, view) + ((imp.fact_layers,) if imp.fact_layers else ())


def find_fact_heads(model, tokenizer, cache) -> FactHeads:
    """The fact heads of ``model`` for the scoring settings of ``cache``: calibrated on first use
    (one prefill and reconstruction of :data:`~chelsea.scoring.calibration.CALIBRATION_PROMPTS`
    short prompts in a cache like ``cache``), remembered on the model and stored in the model
    cache folder (:mod:`.store`) for the same weights and settings. Layer indices count the
    layers the cache holds; with ``fact_layers`` the heads are chosen among the first that many
    layers only."""
    key = fact_settings(cache)
    memo = model.__dict__.setdefault("_chelsea_fact_heads", {})
    stored = None if key in memo else stored_path(model, "fact_heads", (CALIBRATION_VERSION, key))
    if stored is not None and stored.is_file():
        try:
            data = json.loads(stored.read_text())
            memo[key] = FactHeads(tuple(tuple(h) for h in data["heads"]), tuple(data["hit_rate"]),
                                  tuple(tuple(p) for p in data.get("profile", ())))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged file: calibrate again
    if key not in memo:
        memo[key] = _calibrate(model, tokenizer, cache)
        log.info("fact heads (layer, KV head: share of the calibration codes in its top 10%%): %s",
                 ", ".join(f"L{l}h{h} {r:.2f}" for (l, h), r in zip(memo[key].heads, memo[key].hit_rate)))
        if stored is not None:
            try:
                stored.parent.mkdir(parents=True, exist_ok=True)
                stored.write_text(json.dumps({"heads": memo[key].heads, "hit_rate": memo[key].hit_rate, "profile": memo[key].profile}))
            except OSError:
                pass  # a read-only cache folder: calibrate again next time
    return memo[key]


def _calibrate(model, tokenizer, cache) -> FactHeads:
    """Score the calibration prompts by reconstruction in a cache like ``cache``; choose the heads."""
    if tokenizer is None:
        raise ChelseaError("fact-head calibration needs the tokenizer (to write its prompts)")
    cfg, imp = cache.config, cache.method.scoring
    longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    length = CALIBRATION_LENGTH if not isinstance(longest, int) else max(256, min(CALIBRATION_LENGTH, longest // 2))
    ids, positions = calibration_prompts(tokenizer, length=length, codes=max(2, CODES_PER_PROMPT * length // CALIBRATION_LENGTH))
    ids, probe = ids.to(model.device), cache.empty_like()
    with probe.held(), torch.no_grad(), tqdm(total=2, desc="calibrating the fact heads (once per model)", unit="pass") as bar:
        model(ids, **cache_arg(model, probe), use_cache=True, logits_to_keep=1)
        bar.update()
        # every layer: the budget profile needs them all
        score_by_reconstruction(model, probe, ids, tokenizer, view=imp.importance if imp.importance in VIEWS else "local")
        bar.update()
    scores = [layer.scores for layer in probe.layers if layer.is_initialized]
    chosen = choose_heads(head_hits(scores[: imp.fact_layers], positions, cfg.sink_tokens, cfg.window), imp.fact_heads)
    profile = tuple(tuple(score_profile(s[:, :, cfg.sink_tokens : s.shape[-1] - cfg.window]).tolist()) for s in scores)
    return FactHeads(chosen.heads, chosen.hit_rate, profile)


def rank_by_fact_heads(cache, heads: FactHeads, weight: float) -> None:
    """Rewrite every layer's region scores as its own percentile plus ``weight`` times the fact
    heads' agreement (:func:`lend_ranks`), from the scores now; after the layer budgets are split,
    so the budgets stay the ones the layers' own scores asked for."""
    cfg = cache.config
    layers = [layer for layer in cache.layers if layer.is_initialized]
    agreed = consensus([layer.scores for layer in layers], heads, cfg.sink_tokens, cfg.window)
    alike: dict[torch.Size, list[torch.Tensor]] = {}  # one sort for all layers of a shape
    for layer in layers:
        region = layer.scores[:, :, cfg.sink_tokens : layer.length - cfg.window]
        alike.setdefault(region.shape, []).append(region)
    for regions in alike.values():
        for region, ranked in zip(regions, lend_ranks(torch.stack(regions), agreed, weight)):
            region.copy_(ranked)
