"""A learned scorer: per layer, a linear model that predicts ``chelsea``'s reconstruction scores
from what the layer already computes, so scoring costs a matrix product instead of a second pass.

After KVzap (arXiv 2601.07891), which fits such models to KVzip's scores, but fitted to this
project's own verdict: the teacher is ``chelsea`` with context reconstruction (every layer's
scores, each token's surprisal added) and the fact heads' agreement (:mod:`.fact_heads`).

Per layer, from each entry's **value** and the norms of its **key's rotary pairs** (dimensions
``i`` and ``i + d/2``, which RoPE rotates together: their norm does not depend on the position),
of every KV head of the layer, one linear map predicts

- each KV head's score (its logarithm): what splits the budget over layers, and
- the fact heads' agreement on the token (a percentile in [0, 1]).

An entry's score is ``exp(predicted log-score) + fact_weight * predicted agreement``: absolute, so
an entry of the prompt and a token decoded later rank on one scale. Every new entry gets its score
in the forward that writes it (decoded tokens, chat turns, streamed chunks), through the layers'
observers (:func:`learned_scorer`); :func:`score_learned` scores a whole context for
:func:`chelsea.scoring.compress_context` without any extra forward. A cache that no pass has scored
whole (a context read in chunks, a chat fed turn by turn) splits its budget over layers by the
score profile the fit measured per layer, as a whole context splits it by its own scores.

The fit is ridge regression in closed form over the teacher's scores on :data:`~.calibration.
TRAINING_PROMPTS` prompts (essays of the calibration set with planted codes, and code-like text:
:func:`.calibration.training_prompts`), deterministic for a seed; two more prompts are held out to
measure how well the predicted ranking agrees with the teacher's. It runs once per model and
teacher settings (whatever the cache's sinks and window: the teacher keeps its own), on first use
or with ``chelsea calibrate``, and is stored like the fact heads (:mod:`.store`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..cache import ClusteredCache, ClusteredLayer
from ..errors import ChelseaError
from ..kernels import fused_scoring_applies, score_tails
from ..settings import CompressionConfig
from .budgets import score_profile, split_budgets
from .calibration import TRAINING_LENGTH, TRAINING_PROMPTS, training_prompts
from .fact_heads import consensus, find_fact_heads, lend_ranks
from .store import shipped_path, stored_path

LEARNED_VERSION = 2  # raise when the fit changes, so stored scorers are not reused
TEACHER_REGION = (4, 64)  # the teacher's sinks and window (the defaults): the fit does not depend on the cache's own
HELD_OUT = 2
STACK_ELEMENTS = 1 << 22  # new key elements of all layers together up to which they are scored in one batched product
CHUNK_ELEMENTS = 1 << 24  # key elements per product beyond which a layer's entries are scored in pieces (bounds the features' memory)
TOP_SHARE = 0.2  # the metrics' kept share: what 80% removed keeps
log = logging.getLogger(__name__)


def features(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[batch, n, F + 1]`` float32: per entry, every KV head's value and rotary-pair key norms, and a 1."""
    half = keys.shape[-1] // 2
    k = keys.float()
    pairs = (k[..., :half].square() + k[..., half : 2 * half].square()).sqrt()
    x = torch.cat([values.float(), pairs], dim=-1)  # [batch, kv, n, d_v + d/2]
    x = x.permute(0, 2, 1, 3).flatten(2)
    return torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=-1)


def _own_scores(y: torch.Tensor) -> torch.Tensor:
    """The scores ``[..., kv]`` of a map's output ``y`` ``[..., kv + 1]``: its predicted log-scores,
    capped at 1, exponentiated (the last column is the agreement)."""
    return y[..., :-1].clamp(max=1.0).exp()


def learned_key(config, method) -> tuple:
    """What a learned scorer depends on: the teacher's settings (and the fit's version). Not the
    cache's sinks and window: the teacher always protects :data:`TEACHER_REGION`'s, so one scorer
    serves every choice of them (a new ``--window`` does not fit again)."""
    imp = method.scoring
    return (LEARNED_VERSION, imp.output_norm, *TEACHER_REGION, imp.fact_heads, imp.fact_layers, imp.surprise_weight, imp.repeat_chunk)


def teacher_config(config: CompressionConfig, length: int) -> CompressionConfig:
    """``config`` with the teacher's sinks and window (:data:`TEACHER_REGION`; the window at most an
    eighth of a ``length``-token training prompt, so short prompts keep a region to learn from)."""
    sinks, window = TEACHER_REGION
    return dataclasses.replace(config, sink_tokens=sinks, window=min(window, length // 8))


@dataclass
class LearnedScorer:
    """The fitted maps, one per cache layer (``[F + 1, kv_heads + 1]``), and how well they did."""

    weights: list[torch.Tensor]
    metrics: dict = field(default_factory=dict)
    profile: torch.Tensor | None = None  # [layers, points]: quantiles of each layer's predicted scores (held-out prompts)
    _stacked: dict = field(default_factory=dict, repr=False, compare=False)

    def predict(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [batch, kv_heads, n], agreement [batch, n])`` of entries ``keys``/``values``."""
        w = self.weights[layer]
        if w.device != keys.device:
            w = self.weights[layer] = w.to(keys.device)
        step = max(1, CHUNK_ELEMENTS // max(1, keys[:, :, :1].numel()))
        y = torch.cat([features(keys[:, :, i : i + step], values[:, :, i : i + step]) @ w for i in range(0, max(1, keys.shape[2]), step)], 1)
        return _own_scores(y).transpose(1, 2), y[..., -1]

    def score_new(self, cache) -> None:
        """Score the entries the last forward wrote, in every layer of ``cache``: each layer's own
        predicted scores plus ``fact_weight`` times the agreement predicted by all layers together
        (their mean). At the write slot when the layers are pinned (a CUDA graph's step). The
        layers go through one batched product when they share a device and shape, their new
        entries read and their scores written for all layers at once (:meth:`ClusteredLayer.newest_entries`;
        on a GPU the whole prediction is two launches, :mod:`chelsea.kernels.learned_scores`); a long
        forward (a batched prefill) goes layer by layer, in pieces, so its features never hold all
        layers' entries at once."""
        layers = [(i, layer) for i, layer in enumerate(cache.layers) if layer.is_initialized and layer.new_tokens]
        if not layers:
            return
        indices, members = [i for i, _ in layers], [layer for _, layer in layers]
        weight = cache.method.scoring.fact_weight
        tails = ClusteredLayer.newest_entries(members)  # every layer's new entries read and scored in one launch each
        if tails is not None and tails.uniform and tails.elements <= STACK_ELEMENTS:
            self._share_budgets(cache, members)
            weights = self._stacked_weights(indices, tails.keys[0].device)
            if _fused[0] and fused_scoring_applies(tails, weights) and _score_fused(tails, weights, weight):
                return
            own, agreed = self._predict_stacked(indices, *tails.read())
            tails.write(own.add_(agreed[None, :, None, :], alpha=weight))
            return
        keys, values = zip(*(_new_entries(layer) for layer in members))
        if len({(k.device, k.shape, v.shape) for k, v in zip(keys, values)}) == 1 and sum(k.numel() for k in keys) <= STACK_ELEMENTS:
            own, agreed = self._predict_stacked(indices, torch.stack(keys), torch.stack(values))
            scores = own.add_(agreed[None, :, None, :], alpha=weight)  # [layers, batch, kv, n]: one kernel for all layers
        else:  # layers spread over devices, shaped differently, or too many entries to stack: one product each
            predictions = [self.predict(i, k, v) for i, k, v in zip(indices, keys, values)]
            agreed = torch.stack([p[1].to(predictions[0][1].device) for p in predictions]).mean(0)
            scores = [p[0].add_(agreed.to(p[0].device)[:, None, :], alpha=weight) for p in predictions]
        self._share_budgets(cache, members)
        for layer, score in zip(members, scores):
            layer.score_new_entries(score)

    def _share_budgets(self, cache, layers: list) -> None:
        """Uneven layer budgets for a cache that no pass has scored whole (a context read in chunks,
        a chat fed turn by turn): split by this scorer's score profile (:func:`.budgets.split_budgets`), as
        :func:`compress_context` splits a whole context by its scores. Without it every chunk
        would be cut to an even share per layer, which loses the facts that a few layers hold.
        Only after forwards of several tokens and before any whole-context scoring (whose split
        stands), never inside a captured decoding step."""
        if self.profile is None or len(self.profile) != len(cache.layers) or len(layers) != len(cache.layers):
            return
        if any(layer.new_tokens <= 1 or layer.pinned or not layer.rescore for layer in layers):
            return
        if cache.config.budget(layers[0].seen) >= layers[0].seen:  # nothing to remove yet: the shares stay
            return
        split_budgets(cache, cache.method.scoring.layer_floor, profile=self.profile)

    def _predict_stacked(self, indices: list[int], keys: torch.Tensor, values: torch.Tensor):
        """:meth:`predict` of several layers' entries ``[layers, batch, kv, n, d]`` at once:
        ``(scores [layers, batch, kv, n], agreement averaged over the layers [batch, n])``."""
        count, batch, _, n, _ = keys.shape
        x = features(keys.flatten(0, 1), values.flatten(0, 1)).view(count, batch * n, -1)
        y = torch.bmm(x, self._stacked_weights(indices, keys.device)).view(count, batch, n, -1)
        return _own_scores(y).transpose(2, 3), y[..., -1].mean(0)

    def _stacked_weights(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """The maps of layers ``indices`` as one ``[layers, F + 1, kv + 1]`` tensor on ``device`` (kept for the next call)."""
        key = (tuple(indices), device)
        if self._stacked.get("key") != key:
            self._stacked = {"key": key, "weights": torch.stack([self.weights[i] for i in indices]).to(device).contiguous()}
        return self._stacked["weights"]

    def to_dict(self) -> dict:
        return {"version": LEARNED_VERSION, "weights": [w.cpu() for w in self.weights], "metrics": self.metrics,
                "profile": self.profile}


_fused = [True]  # whether the fused kernels may run (off once they failed to compile or launch on this machine)


def _score_fused(tails, weights: torch.Tensor, fact_weight: float) -> bool:
    """:func:`~chelsea.kernels.score_tails`; ``False`` (and the PyTorch path from then on) if the
    kernels cannot be built or launched here, which Triton reports only on first use."""
    try:
        score_tails(tails, weights, fact_weight)
        return True
    except Exception as err:  # noqa: BLE001 - a GPU or Triton build without what the kernels need
        _fused[0] = False
        log.warning("the fused learned-scoring kernels failed (%s); scoring with PyTorch operations from now on", err)
        return False


def _new_entries(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values ``[batch, kv, n, d]`` the last forward wrote into ``layer``."""
    if layer.pinned:
        return layer._key_buf.index_select(2, layer.slot), layer._value_buf.index_select(2, layer.slot)
    start = layer.length - layer.new_tokens
    return layer._key_buf[:, :, start : layer.length], layer._value_buf[:, :, start : layer.length]


def _asks_learned(method) -> bool:
    return method.scores == "importance" and method.scoring.importance == "learned"


def learned_scorer(module, cache_layer) -> LearnedScorer | None:
    """The learned scorer lent to attention ``module`` for ``cache_layer``'s settings, or ``None``
    (its method does not ask for one, or the model was not calibrated yet)."""
    method = cache_layer.method
    if module is None or not _asks_learned(method):
        return None
    table = getattr(module, "_chelsea_learned", None)
    return None if not table else table.get(learned_key(cache_layer.config, method))


def _attentions(model) -> dict[int, torch.nn.Module]:
    return {m.layer_idx: m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "o_proj")}


def _scored_cache(model, kwargs):
    """The cache of a decoder forward when its method is scored by a learned scorer lent to ``model``."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    method = getattr(cache, "method", None)
    if method is None or not _asks_learned(method) or cache.__dict__.get("_learned_scored_whole"):
        return None, None
    scorer = model.__dict__.get("_chelsea_learned", {}).get(learned_key(cache.config, method))
    return cache, scorer


@torch.compiler.disable
def _before_forward(decoder, args, kwargs):
    """Hold the cache's compression until the forward's end, when every layer's new entries have their scores."""
    cache, scorer = _scored_cache(decoder, kwargs)
    if scorer is not None:
        cache._learned_held = cache._hold
        cache._hold = True


@torch.compiler.disable
def _after_forward(decoder, args, kwargs, output):
    cache, scorer = _scored_cache(decoder, kwargs)
    if scorer is None or not hasattr(cache, "_learned_held"):
        return
    scorer.score_new(cache)
    held = cache.__dict__.pop("_learned_held")
    if not held:
        cache._hold = False
        for layer in cache.layers:
            layer.hold = False
        if not any(getattr(layer, "pinned", False) for layer in cache.layers):  # a graph's step compresses outside
            cache.compress_due()


def _lend(model, scorer: LearnedScorer, key) -> None:
    """Lend ``scorer`` to ``model``: its attention modules (their layers' observers leave the new
    entries to it) and its decoder, whose forwards then end by scoring every layer's new entries."""
    for layer, module in _attentions(model).items():
        if layer < len(scorer.weights):
            module.__dict__.setdefault("_chelsea_learned", {})[key] = scorer
    decoder = model.get_decoder()
    decoder.__dict__.setdefault("_chelsea_learned", {})[key] = scorer
    if not decoder.__dict__.get("_chelsea_learned_hooks"):
        decoder.register_forward_pre_hook(_before_forward, with_kwargs=True)
        decoder.register_forward_hook(_after_forward, with_kwargs=True)
        decoder.__dict__["_chelsea_learned_hooks"] = True


def find_learned(model, tokenizer, cache) -> LearnedScorer:
    """The learned scorer of ``model`` for ``cache``'s settings: fitted on first use (the fact heads
    too, if need be), remembered on the model, stored in the model cache folder, and lent to the
    model's attention modules so that every later forward scores its new entries with it. A
    built-in model's scorer may ship with the package (:func:`.store.shipped_path`)."""
    key = learned_key(cache.config, cache.method)
    memo = model.__dict__.setdefault("_chelsea_learned", {})
    if key not in memo:
        stored = stored_path(model, "learned", key, suffix="pt")
        for path in (stored, shipped_path(model, "learned", key, suffix="pt")):
            if key not in memo and path is not None and path.is_file():
                try:
                    data = torch.load(path, map_location="cpu", weights_only=True)
                    profile = data.get("profile")
                    memo[key] = LearnedScorer([w.float() for w in data["weights"]], dict(data.get("metrics", {})),
                                              None if profile is None else profile.float())
                except (OSError, RuntimeError, KeyError, ValueError):
                    pass  # a damaged file: fit again
        if key not in memo:
            memo[key] = train_learned(model, tokenizer, cache)
            if stored is not None:
                try:
                    stored.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(memo[key].to_dict(), stored)
                except OSError:
                    pass  # a read-only cache folder: fit again next time
    _lend(model, memo[key], key)
    return memo[key]


def prepare_scoring(model, tokenizer, cache) -> LearnedScorer | None:
    """Make ``model``'s plain forwards score ``cache``'s entries as :func:`compress_context` would:
    for a method scored by the learned scorer, find (or fit) it and lend it to the model, so text
    appended in forwards of its own (a chat, a context read in chunks) gets its scores as it is
    written. Returns the scorer, or ``None`` for a method that does not use one (nothing to do)."""
    method = getattr(cache, "method", None)
    return find_learned(model, tokenizer, cache) if method is not None and _asks_learned(method) else None


def train_learned(model, tokenizer, cache, *, prompts: int = TRAINING_PROMPTS, length: int = TRAINING_LENGTH,
                  seed: int = 0, ridge: float = 1e-3) -> LearnedScorer:
    """Fit the scorer for ``cache``'s method and settings on ``prompts`` training prompts (and
    measure it on :data:`HELD_OUT` more); see the module doc."""
    from .context import score_context  # the teacher (context imports this module lazily too)

    if tokenizer is None:
        raise ChelseaError("fitting the learned scorer needs the tokenizer (to write its prompts)")
    start = time.perf_counter()
    longest = getattr(model.config, "max_position_embeddings", None)
    length = min(length, longest // 2) if isinstance(longest, int) else length
    teacher = ClusteredCache(teacher_config(cache.config, length),
                             method=cache.method.replace(importance="local", repeat_depth="all", score_layers="all", layer_budgets="scores"))
    heads = find_fact_heads(model, tokenizer, teacher)
    ids = training_prompts(tokenizer, count=prompts + HELD_OUT, length=length, seed=seed).to(model.device)
    sums: list[list[torch.Tensor]] = []
    held = []
    for row in tqdm(range(len(ids)), desc="fitting the learned scorer (once per model)", unit="prompt"):
        probe = teacher.empty_like()
        with torch.no_grad():
            score_context(model, probe, ids[row : row + 1], tokenizer)
        x, y, region = _examples(probe, heads)
        if row >= prompts:
            held.append((x, y, region))
            continue
        for i, (xi, yi) in enumerate(zip(x, y)):
            xi64, yi64 = xi.double(), yi.double()
            if len(sums) <= i:
                sums.append([xi64.T @ xi64, xi64.T @ yi64])
            else:
                sums[i][0] += xi64.T @ xi64
                sums[i][1] += xi64.T @ yi64
    weights = []
    for xtx, xty in sums:
        reg = ridge * xtx.diagonal().mean() * torch.eye(len(xtx), dtype=xtx.dtype, device=xtx.device)
        weights.append(torch.linalg.solve(xtx + reg, xty).float().cpu())
    scorer = LearnedScorer(weights, profile=_profile(weights, held))
    scorer.metrics = {**_agreement(scorer, held, cache.method.scoring.fact_weight), "seconds": round(time.perf_counter() - start, 2),
                      "prompts": prompts, "length": length}
    log.info("learned scorer fitted: %s", scorer.metrics)
    return scorer


def _examples(probe, heads):
    """Per layer: features ``[n_region, F+1]``, targets ``[n_region, kv+1]`` (log-scores, agreement),
    and the teacher's region scores ``[1, kv, n_region]``, of one scored prompt."""
    cfg = probe.config
    layers = [layer for layer in probe.layers if layer.is_initialized]
    agreed = consensus([layer.scores for layer in layers], heads, cfg.sink_tokens, cfg.window)[0]  # [n_region]
    xs, ys, regions = [], [], []
    for layer in layers:
        lo, hi = cfg.sink_tokens, layer.length - cfg.window
        xs.append(features(layer.keys[:, :, lo:hi], layer.values[:, :, lo:hi])[0])
        own = layer.scores[:, :, lo:hi]
        ys.append(torch.cat([own[0].clamp_min(1e-6).log().T, agreed[:, None]], dim=-1))
        regions.append(own.clone())
    return xs, ys, (regions, agreed)


def _profile(weights: list[torch.Tensor], held: list) -> torch.Tensor:
    """``[layers, points]``: each layer's predicted region scores on the held-out prompts, as
    quantiles (:func:`.budgets.score_profile`, averaged over the prompts)."""
    profiles = []
    for xs, _, _ in held:
        predicted = [_own_scores(x @ w.to(x.device)).T[None] for x, w in zip(xs, weights)]
        profiles.append(torch.stack([score_profile(p).cpu() for p in predicted]))
    return torch.stack(profiles).mean(0)


def _agreement(scorer: LearnedScorer, held: list, fact_weight: float) -> dict:
    """How the predicted ranking (as inference makes it: every layer's own scores, the agreement
    of all layers together) agrees with the teacher's on the held-out prompts: Spearman's rank
    correlation and the overlap of the top :data:`TOP_SHARE`, averaged over layers and KV heads."""
    rhos, overlaps = [], []
    for xs, _, (regions, agreed) in held:
        ys = [x @ w.to(x.device) for x, w in zip(xs, scorer.weights)]
        mean = torch.stack([y[:, -1] for y in ys]).mean(0)
        for y, own in zip(ys, regions):
            predicted = _own_scores(y).T + fact_weight * mean[None]  # [kv, n]
            teacher = lend_ranks(own, agreed[None], fact_weight)[0]
            for a, b in zip(predicted, teacher):
                ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
                rhos.append(float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]))
                k = max(1, int(TOP_SHARE * len(a)))
                overlaps.append(len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k)
    return {"spearman": round(sum(rhos) / len(rhos), 4), "top_overlap": round(sum(overlaps) / len(overlaps), 4)}


def score_learned(model, cache, input_ids: torch.Tensor, tokenizer, *, attention_mask=None, question: bool = False):
    """:func:`chelsea.scoring.context.score_context` for ``importance="learned"``: one prefill, every
    layer's predicted scores; the budget is split by them, then the fact term is added."""
    from ..compat import cache_arg
    from .context import ContextScores

    scorer = find_learned(model, tokenizer, cache)
    cache.__dict__["_learned_scored_whole"] = True  # the hooks would score what is scored whole below
    try:
        with cache.held(question=question), torch.no_grad():
            logits = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1, **cache_arg(model, cache)).logits
    finally:
        del cache.__dict__["_learned_scored_whole"]
    layers, agreements = [], []
    for i, layer in enumerate(cache.layers):
        if layer.is_initialized:
            own, agreed = scorer.predict(i, layer.keys, layer.values)
            layer.scores.copy_(own)
            layers.append(layer)
            agreements.append(agreed)
    agreed = torch.stack([a.to(agreements[0].device) for a in agreements]).mean(0)  # every layer's prediction of one thing
    weight = cache.method.scoring.fact_weight

    def add_agreement() -> None:
        for layer in layers:
            layer.scores.add_(weight * agreed.to(layer.scores.device)[:, None, :])

    return ContextScores(logits, learned=add_agreement)
