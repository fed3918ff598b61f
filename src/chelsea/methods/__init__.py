"""Compression methods, one file each, known by name through one registry.

Each method is a frozen dataclass (its own settings) with a ``compress`` tensor function over one
layer's ``[batch, kv_heads, seq, ...]`` keys, values and log-counts (:class:`Method`); ``@register``
makes it known to the cache, the CLI, the evaluation and the server. To add one, write a file like
``streaming.py`` (the smallest) and import it below.

- ``chelsea`` (:mod:`.chelsea`, the default): importance-guided clustering.
- ``chelsea-paper`` (:mod:`.chelsea_paper`): the paper's chunked soft matching.
- ``kvzip``, ``snapkv``, ``h2o``, ``streaming``, ``knorm``, ``random``: eviction baselines.
- ``clustergen`` (:mod:`.clustergen`): ClusterGen's online summary, in its own cache layer.
"""

from .base import METHODS, Method, check_settings_known, configure, get_method, method_names, region_bounds, register
from .chelsea import Chelsea, merge_by_importance
from .fitted_merge import ReferenceQueries, concat_references
from .chelsea_paper import ChelseaPaper, chunked_soft_matching
from .kvzip import KVzip
from .streaming import Streaming
from .h2o import H2O
from .snapkv import SnapKV
from .random_eviction import RandomEviction
from .knorm import KNorm
from .clustergen import ClusterGen

__all__ = [
    "METHODS", "Chelsea", "ReferenceQueries", "concat_references", "ChelseaPaper", "ClusterGen", "H2O", "KNorm", "KVzip", "Method", "RandomEviction", "SnapKV",
    "Streaming", "check_settings_known", "chunked_soft_matching", "configure", "get_method", "merge_by_importance", "method_names", "region_bounds", "register",
]
