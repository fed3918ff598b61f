"""Architecture presets with random weights: right for speed and memory, never for accuracy.

``llama3-8b``, ``mistral-7b``, ``qwen2.5-7b`` and ``qwen2.5-0.5b`` build the model from its
configuration alone (no weights to download), for ``chelsea bench`` and the benchmarks. A preset
has no tokenizer of its own: pair it with a tokenizer folder where one is needed.
"""

from __future__ import annotations

import os
import time

import torch

from ..errors import ChelseaError
from .loading import cache_dir, load_model, pick_device, pick_dtype, world_size

PRESETS = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=8, vocab_size=32768, max_position_embeddings=131072, sliding_window=None,
                                  rope_theta=1000000.0)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                                  tie_word_embeddings=True, use_sliding_window=False)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0,
                                use_sliding_window=False)),
}


def load_with_tokenizer(name: str, tokenizer: str | None = None):
    """``(model, tokenizer)`` for the standalone benchmarks: a preset with random weights (which
    has no tokenizer of its own: ``tokenizer`` names a tokenizer folder) or a model as
    :func:`chelsea.models.load_model` takes it (``tokenizer``, if given, replaces its own)."""
    from transformers import AutoTokenizer

    if name in PRESETS:
        if not tokenizer:
            raise ChelseaError(f"the preset {name} has no tokenizer: pass a tokenizer folder (--tokenizer DIR)")
        words = AutoTokenizer.from_pretrained(tokenizer)
        return fit_vocabulary(load_preset_or_model(name), words), words
    model, own = load_model(name)
    return model, AutoTokenizer.from_pretrained(tokenizer) if tokenizer else own


def fit_vocabulary(model, tokenizer):
    """A preset (random weights) paired with another family's tokenizer: its vocabulary widened to
    the tokenizer's ids when they reach beyond it, so prompts the tokenizer writes can be read."""
    if len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model


def load_preset_or_model(name: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None):
    """A preset with random weights, or a real model through :func:`chelsea.models.load_model`.

    Under tensor parallelism (or with ``device_map``) a preset is first saved once, with random
    weights, to ``<cache dir>/presets/<name>`` by rank 0 and then loaded like any local model, so
    transformers shards it by its own plan.
    """
    if name not in PRESETS:
        return load_model(name, device=device, dtype=dtype, device_map=device_map)[0]
    from transformers import AutoConfig, AutoModelForCausalLM

    family, settings = PRESETS[name]
    dev = pick_device(device)
    config = AutoConfig.for_model(family, **settings)
    if world_size() == 1 and device_map is None:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dtype, dev))
        return model.eval()
    folder = cache_dir() / "presets" / name
    if int(os.environ.get("RANK", "0")) == 0 and not (folder / "done").is_file():
        AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dtype, dev)).save_pretrained(folder)
        (folder / "done").touch()
    deadline = time.monotonic() + 1800
    while not (folder / "done").is_file():
        if time.monotonic() > deadline:
            raise ChelseaError(f"rank 0 did not finish saving the {name} preset to {folder} within 30 minutes")
        time.sleep(2)
    return load_model(str(folder), device=device, dtype=dtype, device_map=device_map)[0]
