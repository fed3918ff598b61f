"""``compress_context``: prefill a context, score it, and compress it once.

For the methods that rank by importance (``kvzip``, ``chelsea``) the flow is: prefill with
compression held back (the last queries score the entries meanwhile, :mod:`.observers`); score by
context reconstruction (:mod:`.reconstruction`) and, for ``chelsea``, add each token's surprisal
(:mod:`.surprisal`); split the budget unevenly over layers (:mod:`.budgets`); for ``chelsea``, let
every layer rank by what the model's fact heads agree on (:mod:`.fact_heads`); compress every
layer at once. With fact heads and ``repeat_depth="facts"`` (the default) the repeat stops after
the deepest fact head's layer, and the deeper layers take an even share of the budget; with
``score_layers="facts"`` so do the layers without a fact head; with ``layer_budgets="calibrated"``
the budget is split by the calibration's score profile, only the fact heads' layers are scored
and no surprisal is computed. Every other method compresses as in any prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat import cache_arg
from ..errors import ChelseaError
from .budgets import split_budgets
from .fact_heads import FactHeads, find_fact_heads, rank_by_fact_heads
from .reconstruction import VIEWS, score_by_reconstruction
from .surprisal import prefill_with_surprisal, surprisal_bonus


def _repeat_layers(cache, heads: FactHeads | None, imp, calibrated: bool) -> tuple[int | None, frozenset[int] | None]:
    """``(depth, scored)``: the repeat runs through the first ``depth`` layers (``None``: all) and
    scores the layers in ``scored`` (``None``: all it runs through); from the fact heads' layers."""
    if heads is None:
        return None, None
    held = [i for i, layer in enumerate(cache.layers) if layer.is_initialized]
    fact_layers = [held[layer] for layer, _ in heads.heads]
    depth = max(fact_layers) + 1 if imp.repeat_depth == "facts" else None
    scored = frozenset(fact_layers) if imp.score_layers == "facts" or calibrated else None
    return depth, scored


@dataclass
class ContextScores:
    """What :func:`score_context` leaves for the compression: the last position's logits and how
    the budget is to be split and ranked."""

    logits: torch.Tensor
    heads: FactHeads | None = None  # rank every layer by these fact heads' agreement
    fact_weight: float = 0.0
    profile: torch.Tensor | None = None  # split the budget by this calibrated profile
    even: frozenset[int] = frozenset()  # layers that keep an even share (scored otherwise than the rest)
    learned: object = None  # the learned scorer's fact terms to add after the split (``importance="learned"``)


def score_context(model, cache, input_ids: torch.Tensor, tokenizer=None, *, attention_mask: torch.Tensor | None = None,
                  reconstruct: str | None = "config", chunk_size: int | None = None, question: bool = False) -> ContextScores:
    """Prefill ``input_ids`` into ``cache`` (an importance-ranked method's) with compression held
    back and leave every entry's score in the layers (before the fact heads' ranking); see
    :func:`compress_context`, which continues from here."""
    imp = cache.method.scoring
    if imp.importance == "learned":
        from .learned import score_learned

        return score_learned(model, cache, input_ids, tokenizer, attention_mask=attention_mask, question=question)
    view = (imp.importance if imp.importance in VIEWS else None) if reconstruct == "config" else reconstruct
    if view is not None and tokenizer is None:
        raise ChelseaError("context reconstruction needs the tokenizer (to write the repeat prompt)")
    surprise_weight = 1.0 if imp.importance == "surprise" else imp.surprise_weight
    heads = find_fact_heads(model, tokenizer, cache) if view is not None and imp.fact_weight else None
    profile = None
    if heads is not None and imp.layer_budgets == "calibrated" and heads.profile:
        profile = torch.tensor(heads.profile)
        surprise_weight = 0.0  # the surprisal would only move the budgets, which the calibration sets
    depth = scored = None
    with cache.held(question=question), torch.no_grad():
        if surprise_weight > 0:
            logits, surprise = prefill_with_surprisal(model, cache, input_ids, attention_mask)
        else:
            logits = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1, **cache_arg(model, cache)).logits
        if view is not None:
            depth, scored = _repeat_layers(cache, heads, imp, profile is not None)
            score_by_reconstruction(model, cache, input_ids, tokenizer, chunk_size=chunk_size or imp.repeat_chunk, view=view,
                                    keep_scores=question, depth=depth, scored=scored)
        elif imp.importance == "surprise":
            for layer in cache.layers:
                layer.scores.zero_()
        if surprise_weight > 0:
            bonus = surprisal_bonus(surprise, surprise_weight)
            for layer in cache.layers:
                layer.scores.add_(bonus[:, None, :].to(layer.scores.device))
    every = range(len(cache.layers))
    even = frozenset(i for i in every if i not in scored) if scored is not None else frozenset(every[depth or len(every):])
    return ContextScores(logits, heads, imp.fact_weight if heads is not None else 0.0, profile, even)


def compress_context(model, cache, input_ids: torch.Tensor, tokenizer=None, *, attention_mask: torch.Tensor | None = None,
                     reconstruct: str | None = "config", chunk_size: int | None = None, question: bool = False) -> torch.Tensor:
    """Prefill ``input_ids`` into ``cache`` and compress it once, for a question that comes later.

    ``reconstruct``: the reconstruction view, ``"local"`` or ``"full"`` (``None`` keeps the
    prompt's own last-query scores; by default the method's ``importance`` setting).
    ``question``: ``input_ids`` end with the question (a prompt compressed whole): each entry's
    score is also at least the largest attention the prompt's last queries give it, so what the
    question reads is kept too. ``chunk_size``: tokens repeated per chunk (by default the
    method's ``repeat_chunk``). Returns the last position's logits ``[batch, 1, vocab]``.
    Continue with ``model.generate(input_ids=<context + question>, past_key_values=cache, ...)``.
    """
    if getattr(cache, "method", None) is None or cache.method.scores != "importance":
        return model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1, **cache_arg(model, cache)).logits
    scores = score_context(model, cache, input_ids, tokenizer, attention_mask=attention_mask, reconstruct=reconstruct,
                           chunk_size=chunk_size, question=question)
    for layer in cache.layers:  # these scores read the whole context: later forwards only score theirs
        layer.rescore = False
    split_budgets(cache, cache.method.scoring.layer_floor, scores.even, scores.profile)
    if scores.heads is not None:
        rank_by_fact_heads(cache, scores.heads, scores.fact_weight)
    if scores.learned is not None:
        scores.learned()
    cache.compress_all()
    return scores.logits
