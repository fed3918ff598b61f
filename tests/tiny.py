"""Tiny randomly initialised models of the supported families, for the tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

SMALL = dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=1024)


def tiny(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=False))
    else:
        model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None))
    return model.to(dtype).eval()


def tiny_with_tokenizer(layers: int = 3):
    """A tiny Llama with the built-in SmolLM2 tokenizer (skips where the model package is missing)."""
    import pytest
    from transformers import AutoTokenizer

    from chelsea.errors import MissingDependencyError
    from chelsea.models import resolve

    try:  # the built-in model's tokenizer (CI installs it; a bare GPU machine may not have it)
        path, extra = resolve("smollm2-135m")
    except MissingDependencyError as err:
        pytest.skip(str(err))
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval(), tokenizer
