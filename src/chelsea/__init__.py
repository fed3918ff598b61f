"""chelsea: long-context LLM inference with a clustered KV cache for Hugging Face transformers.

The important KV entries are kept exact and the rest are merged into count-weighted centroids
instead of being thrown away; attention weighs each centroid by the number of tokens it stands for.

    import chelsea
    chelsea.prepare_model(model)                     # checks the model, selects "chelsea" attention
    cache = chelsea.ClusteredCache(ratio=0.8)        # the default method, keep 20% of the KV cache
    chelsea.compress_context(model, cache, context_ids, tokenizer)    # score and compress a document
    out = model.generate(input_ids=full_ids, past_key_values=cache, max_new_tokens=32)
"""

from .attention import ATTN_IMPLEMENTATION, register, weighted_attention
from .cache import ClusteredCache, ClusteredLayer
from .errors import ChelseaError, MissingDependencyError, UnsupportedModelError
from .methods import METHODS, Method, get_method, method_names, register as register_method
from .models import check_model_config
from .scoring import compress_context
from .settings import CompressionConfig, Importance

__version__ = "0.2.0"


def prepare_model(model):
    """Check that ``model`` can take the clustered cache and switch it to the "chelsea" attention.

    The "chelsea" attention gives the same results as SDPA for an ordinary cache, so the model
    can keep serving plain requests too. Returns the model.
    """
    check_model_config(model.config)
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


__all__ = [
    "ATTN_IMPLEMENTATION",
    "METHODS",
    "ChelseaError",
    "ClusteredCache",
    "ClusteredLayer",
    "CompressionConfig",
    "Importance",
    "Method",
    "MissingDependencyError",
    "UnsupportedModelError",
    "compress_context",
    "get_method",
    "method_names",
    "prepare_model",
    "register",
    "register_method",
    "weighted_attention",
]
