"""Running a model with a compressed cache: timed generation and CUDA-graph decoding."""

from .decoding import GraphDecoder, RowStep, fuse_layers
from .generation import GenerationResult, cache_stats, encode, generate, make_cache, method_choices, prefill, sync, use_method

__all__ = ["GenerationResult", "GraphDecoder", "RowStep", "cache_stats", "encode", "fuse_layers", "generate", "make_cache", "method_choices", "prefill", "sync",
           "use_method"]
