"""How scoring reaches the cache: an observer on every layer whose method ranks by scores.

The cache stores; it does not know how scores are made. A layer of a method with ``scores`` set
(:class:`chelsea.methods.Method`) gets an observer from the provider registered for that kind of
score, and shows it every attention the layer computes. :mod:`chelsea.scoring` registers the
providers (``"attention"``: the attention each entry received; ``"importance"``: the last
queries' attention, or a learned scorer) and, for a context-reconstruction pass, swaps a layer's
observer for one that computes the repeat's attention itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ChelseaError


class ScoreObserver:
    """What a scoring strategy implements; the default does nothing."""

    #: Whether :meth:`observe` has work after a forward of one new token (a decoding step);
    #: ``False`` lets the layer skip the call then (a server's step makes one per layer).
    single_tokens = True

    def attend(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, log_counts: torch.Tensor | None,
               scale: float | None, module=None) -> torch.Tensor | None:
        """The attention output, when the observer computes it itself (then the layer does not
        compress after this forward); ``None`` lets the layer attend as usual."""
        return None

    def observe(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, log_counts: torch.Tensor | None,
                scale: float | None, scores: torch.Tensor, module=None) -> None:
        """After the layer attended: update ``scores`` (the per-entry scores aligned with ``key`` and
        ``value``; the whole buffers when the layer is pinned, its new token at ``layer.slot``).
        ``module`` is the model's attention module."""


_PROVIDERS: dict[str, Callable[[object], ScoreObserver]] = {}


def provide(kind: str, factory: Callable[[object], ScoreObserver]) -> None:
    """Register ``factory(method) -> observer`` for the methods whose ``scores`` is ``kind``."""
    _PROVIDERS[kind] = factory


def observer_for(method) -> ScoreObserver | None:
    """The observer a layer of ``method`` needs (``None`` when the method keeps no scores)."""
    if method.scores is None:
        return None
    if method.scores not in _PROVIDERS:
        raise ChelseaError(f"{method.name} ranks by {method.scores!r} scores, which no scoring package provides "
                           "(import chelsea, which registers chelsea.scoring)")
    return _PROVIDERS[method.scores](method)
