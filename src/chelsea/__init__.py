"""chelsea: long-context LLM inference with a clustered KV cache for Hugging Face transformers.

Similar keys and values are merged into weighted centroids (Chelsea's chunked soft matching)
instead of being kept one per token or thrown away; attention weighs each centroid by the number of
tokens it stands for.

    import chelsea
    model = chelsea.prepare_model(model)             # checks the model, selects "chelsea" attention
    cache = chelsea.ClusteredCache(ratio=0.8)        # keep 20% of the KV cache
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
"""

from .attention import ATTN_IMPLEMENTATION, register, weighted_attention
from .cache import ClusteredCache, ClusteredLayer
from .config import ClusterGenConfig, CompressionConfig
from .errors import ChelseaError, MissingDependencyError, UnsupportedModelError
from .methods.chelsea import chunked_soft_matching
from .support import check_model_config

__version__ = "0.1.0"


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
    "ChelseaError",
    "ClusterGenConfig",
    "ClusteredCache",
    "ClusteredLayer",
    "CompressionConfig",
    "MissingDependencyError",
    "UnsupportedModelError",
    "chunked_soft_matching",
    "prepare_model",
    "register",
    "weighted_attention",
]
