"""The score observers the cache layers get (:mod:`chelsea.cache.observer`): scores made while attending.

- :class:`AttentionMass` (methods with ``scores="attention"``: H2O, SnapKV): every forward adds
  the attention each entry receives, from a prompt's last ``observation_window`` queries (all of
  them when ``None``) and from every decoded query.
- :class:`LastQueries` (methods with ``scores="importance"``: kvzip, chelsea), unless the method's
  ``importance`` is ``"learned"`` and the model has its learned scorer (:mod:`.learned`), which then
  scores every new entry, decoded tokens included. Otherwise a forward of several
  tokens scores entries by the attention of its last :data:`OBSERVATION_WINDOW` queries: their sum,
  or, when the prompt ends with the question (``layer.question``), their largest attention (a
  probability, comparable with the reconstruction scores). It is the fallback when no scoring pass
  runs (a plain ``model.generate``) and the question's share when one does. Where the cache
  compresses inside the forward (text read in blocks), each block's last queries score every entry
  again (``layer.rescore``), so entries scored by different blocks never compete; once a pass has
  scored the whole context, later forwards score only their own entries. Decoded tokens start at 0.

Both keep, for a method that fits its merges (:attr:`chelsea.methods.Method.references`), the last
queries of every forward of several tokens and their log-normalisers in ``layer.references``, for
the compression that follows (:func:`keep_references`).
"""

from __future__ import annotations

from ..cache import ScoreObserver, provide
from ..methods import ReferenceQueries
from .attention_scores import attention_mass, largest_attention_received, last_query_normalisers
from .learned import learned_scorer

OBSERVATION_WINDOW = 32


def keep_references(layer, query, key, log_counts, scale) -> None:
    """Leave the forward's last ``layer.method.references`` queries (after rotary embedding) and
    their log-normalisers over the stored entries in ``layer.references``."""
    wanted = layer.method.references
    if not wanted or layer.new_tokens <= 1:
        return
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    last = min(wanted, query.shape[2])
    lse = last_query_normalisers(query, key, log_counts, scale=scale, last=last)
    layer.references = ReferenceQueries(query[:, :, -last:].detach(), lse, scale)


class AttentionMass(ScoreObserver):
    """Adds the attention each entry receives to its score."""

    def __init__(self, method):
        self.window = method.observation_window

    def observe(self, layer, query, key, value, log_counts, scale, scores, module=None):
        keep_references(layer, query, key, log_counts, scale)
        last = self.window if layer.new_tokens > 1 else None
        scores.add_(attention_mass(query, key, log_counts, scale=scale, last=last))


class LastQueries(ScoreObserver):
    """Scores the entries of a forward of several tokens by its last queries' attention."""

    single_tokens = False  # decoded tokens start at 0, or get the learned scorer's score after the forward

    def __init__(self, method=None):
        pass

    def observe(self, layer, query, key, value, log_counts, scale, scores, module=None):
        keep_references(layer, query, key, log_counts, scale)
        if learned_scorer(module, layer) is not None:  # the learned scorer scores the new entries at the forward's end
            return
        new = layer.new_tokens
        if new <= 1:  # decoded tokens start at 0
            return
        score = largest_attention_received if layer.question else attention_mass
        mass = score(query, key, log_counts, scale=scale, last=OBSERVATION_WINDOW)
        if layer.rescore:
            scores.copy_(mass)
        else:
            scores[:, :, -new:] = mass[:, :, -new:]


provide("attention", AttentionMass)
provide("importance", LastQueries)
