"""Models: the built-in ones (GGUF files shipped in PyPI packages), any transformers id or path,
random-weight architecture presets for benchmarks, and the checks that refuse what the clustered
cache cannot serve."""

from .loading import BUILTIN_MODELS, DEFAULT_MODEL, cache_dir, load_model, pick_device, pick_dtype, resolve, world_size
from .presets import PRESETS, fit_vocabulary, load_preset_or_model, load_with_tokenizer
from .support import SUPPORTED_MODEL_TYPES, check_model_config, check_prompt_length, check_tensor_parallel

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "PRESETS", "SUPPORTED_MODEL_TYPES", "cache_dir", "check_model_config",
           "check_prompt_length", "check_tensor_parallel", "fit_vocabulary", "load_model", "load_preset_or_model", "load_with_tokenizer",
           "pick_device", "pick_dtype", "resolve", "world_size"]
