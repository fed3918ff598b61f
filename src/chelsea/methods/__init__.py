"""Compression methods as plain tensor functions, one file each.

Every function has the signature ``f(keys, values, log_counts, n_remove, *, chunk_size, sink_tokens,
window, step_fraction) -> (keys, values, log_counts)`` over ``[batch, kv_heads, seq, ...]`` and is
plugged into :class:`chelsea.cache.ClusteredCache` as its ``compressor``; the budget rule is the
same for all (ratio R removes the same number of entries).

Methods that rank entries by the attention they receive (``h2o``, ``snapkv``) carry
``uses_attention = True`` and ``observation_window`` (how many of a prompt's last queries count;
``None`` for all). The cache then keeps a running attention score per entry, passes it in as
``scores=`` and gets the kept entries' scores back as a fourth tensor.

Methods that rank by importance (``kvzip``, ``chelsea``) carry ``uses_importance = True``: the cache
keeps a score per entry from :mod:`chelsea.importance` (context reconstruction, or the prompt's last
queries), passes it and the guided-merge settings in, and splits the budget unevenly over layers.

``chelsea`` is importance-guided clustering (:func:`guided_merge`): the important entries stay
exact and the rest are merged into them. ``chelsea-paper`` is the paper's chunked soft matching
(:func:`chunked_soft_matching`), which merges by similarity alone. ``guided`` is the earlier name
of ``chelsea`` and still accepted (results written under it stay comparable).
"""

from .chelsea import chunked_soft_matching
from .guided import guided_merge
from .h2o import h2o_evict
from .knorm import knorm_evict
from .kvzip import kvzip_evict
from .random_eviction import random_evict
from .snapkv import snapkv_evict
from .streaming import streaming_evict

COMPRESSORS = {
    "chelsea": guided_merge,
    "chelsea-paper": chunked_soft_matching,
    "guided": guided_merge,
    "kvzip": kvzip_evict,
    "streaming": streaming_evict,
    "h2o": h2o_evict,
    "snapkv": snapkv_evict,
    "random": random_evict,
    "knorm": knorm_evict,
}

__all__ = [
    "COMPRESSORS",
    "chunked_soft_matching",
    "guided_merge",
    "kvzip_evict",
    "h2o_evict",
    "knorm_evict",
    "random_evict",
    "snapkv_evict",
    "streaming_evict",
]
