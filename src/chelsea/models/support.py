"""Which models the clustered cache can serve, checked before anything runs.

The cache and the ``"chelsea"`` attention rely on a decoder whose attention layers all (a) call
``past_key_values.update`` with post-RoPE keys and (b) go through transformers' attention-function
registry with a plain softmax. Llama, Mistral and Qwen2 (and Qwen3, same layout) do. Sliding-window
layers and logit soft-capping change the softmax itself, so such models get a clear error instead of
silently wrong answers.
"""

from __future__ import annotations

from ..errors import ChelseaError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_model_config(config) -> None:
    """Raise :class:`UnsupportedModelError` naming what does not fit."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)
    max_pos = getattr(config, "max_position_embeddings", None)
    if sliding or (uses_window and window is not None and (max_pos is None or window < max_pos)):
        raise UnsupportedModelError(
            f"{model_type} model with sliding-window attention (sliding_window={window}, layers {sliding or 'all'}): "
            "the clustered cache needs full attention in every layer"
        )
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            raise UnsupportedModelError(f"{model_type} model uses {name}; its attention cannot take the log-count bias")


def check_prompt_length(config, tokens: int, max_new_tokens: int = 0) -> None:
    """Raise when the prompt (plus the tokens to generate) is longer than the model's context."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and tokens + max_new_tokens > limit:
        raise ChelseaError(
            f"prompt of {tokens} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit} tokens; "
            "shorten the prompt or lower --max-new-tokens"
        )


def check_tensor_parallel(config, world_size: int) -> None:
    """Raise when the attention heads cannot be split evenly over ``world_size`` ranks.

    Under tensor parallelism each rank holds ``kv_heads / world_size`` KV heads (and their query
    heads) and clusters only those; a remainder would leave a KV head split between ranks.
    """
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if world_size < 1:
        raise ChelseaError(f"WORLD_SIZE must be at least 1; got {world_size}")
    for name, count in (("KV heads", kv_heads), ("attention heads", heads)):
        if count is not None and count % world_size:
            raise UnsupportedModelError(
                f"the model has {count} {name}, which {world_size} tensor-parallel ranks cannot share evenly; "
                f"run with a number of processes that divides {count} (torchrun --nproc-per-node N)"
            )
