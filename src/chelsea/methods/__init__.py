"""Compression methods as plain tensor functions, one file each.

Every function has the signature ``f(keys, values, log_counts, n_remove, *, chunk_size, sink_tokens,
window, step_fraction) -> (keys, values, log_counts)`` over ``[batch, kv_heads, seq, ...]`` and is
plugged into :class:`chelsea.cache.ClusteredCache` as its ``compressor``; the budget rule is the
same for all (ratio R removes the same number of entries).
"""

from .chelsea import chunked_soft_matching
from .knorm import knorm_evict
from .random_eviction import random_evict
from .streaming import streaming_evict

COMPRESSORS = {
    "chelsea": chunked_soft_matching,
    "streaming": streaming_evict,
    "random": random_evict,
    "knorm": knorm_evict,
}

__all__ = ["COMPRESSORS", "chunked_soft_matching", "knorm_evict", "random_evict", "streaming_evict"]
