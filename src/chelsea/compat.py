"""How to hand a cache to a model across transformers 5.x releases.

Recent releases renamed the ``past_key_values`` argument of the models' forward and of
``generate`` to ``cache`` (the old name still works there, with a FutureWarning); older 5.x
releases, such as 5.17, only know ``past_key_values`` and reject ``cache``.
"""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _forward_takes_cache(model_class: type) -> bool:
    return "cache" in inspect.signature(model_class.forward).parameters


def cache_arg(model, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``model``'s forward (and so its
    ``generate``) takes."""
    return {"cache": cache} if _forward_takes_cache(type(model)) else {"past_key_values": cache}
