"""The clustered KV cache: storage only. Methods decide what to merge or drop
(:mod:`chelsea.methods`); scoring reaches the layers through observers (:mod:`.observer`)."""

from .cache import LAYER_TYPES, ClusteredCache
from .clustergen_layer import ClusterGenLayer
from .compress import compress_together
from .layer import ClusteredLayer
from .observer import ScoreObserver, observer_for, provide

__all__ = ["LAYER_TYPES", "ClusterGenLayer", "ClusteredCache", "ClusteredLayer", "ScoreObserver", "compress_together",
           "observer_for", "provide"]
