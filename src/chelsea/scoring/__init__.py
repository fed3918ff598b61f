"""Scoring: which KV entries the model needs, for the methods that rank by scores.

The cache stores; scoring reaches its layers through observers (:mod:`chelsea.cache.observer`),
registered here for the two kinds of score a method can ask for (:mod:`.observers`). Around a
prefill, :func:`compress_context` scores a whole context once: context reconstruction
(:mod:`.reconstruction`), token surprisal (:mod:`.surprisal`), the fact heads found by a
calibration on planted facts (:mod:`.fact_heads`, :mod:`.calibration`), uneven layer budgets
(:mod:`.budgets`). With the learned scorer (:mod:`.learned`) every forward scores what it writes;
:func:`prepare_scoring` lends it to a model whose cache is filled by plain forwards.
"""

from . import observers  # noqa: F401  (registers the score observers with the cache)
from .context import compress_context
from .fact_heads import FactHeads, find_fact_heads
from .learned import LearnedScorer, find_learned, prepare_scoring, train_learned
from .reconstruction import Reconstruction, output_gram, output_grams, repeat_prompts, score_by_reconstruction
from .surprisal import token_surprisal

__all__ = ["FactHeads", "LearnedScorer", "Reconstruction", "compress_context", "find_fact_heads", "find_learned", "prepare_scoring", "train_learned", "output_gram", "output_grams",
           "repeat_prompts", "score_by_reconstruction", "token_surprisal"]
