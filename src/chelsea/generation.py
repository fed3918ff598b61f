"""One generation with the full cache or a clustered one, timed and measured.

Prefill time runs from the call to ``model.generate`` until the first new token exists (the
prompt's forward pass, the clustering right after it, and the first token's choice); decode time
covers the remaining new tokens. Both are wall-clock seconds on the model's device, synchronised
on CUDA.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache, StoppingCriteria

from .attention import ATTN_IMPLEMENTATION, register
from .cache import ClusteredCache
from .config import ClusterGenConfig, CompressionConfig
from .errors import ChelseaError
from .methods import COMPRESSORS
from .support import check_model_config, check_prompt_length

METHODS = ("full", *COMPRESSORS, "clustergen")


@dataclass
class GenerationResult:
    answer: str
    method: str
    ratio: float | None
    tokens_seen: int
    prompt_tokens: int
    new_tokens: int
    kv_entries: float
    kv_bytes: int
    kv_bytes_full: int
    compressed: bool
    prefill_s: float
    decode_s: float
    tokens: list[int]  # the generated token ids

    def to_dict(self) -> dict:
        return asdict(self)


class _FirstTokenClock(StoppingCriteria):
    """Notes the time at which ``generate`` has produced its first new token; never stops it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.first is None:
            _sync(self.device)
            self.first = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode(tokenizer, context: str, question: str = "", *, chat_template: bool = True, answer_prefix: str = "") -> dict:
    """Tokenize ``context`` followed by ``question`` as one user turn (chat template when the
    tokenizer has one and ``chat_template`` is set), then ``answer_prefix`` as the start of the reply."""
    text = f"{context}\n\n{question}".strip() if question else context
    if chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered + answer_prefix, add_special_tokens=False, return_tensors="pt")
    return tokenizer(f"{text} {answer_prefix}".rstrip(), return_tensors="pt")


def cache_stats(cache) -> dict:
    """Stats of a :class:`ClusteredCache` or of a plain ``DynamicCache`` in the same terms."""
    if isinstance(cache, ClusteredCache):
        return cache.stats()
    layers = [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]
    nbytes = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size() for layer in layers)
    seen = cache.get_seq_length()
    return {"tokens_seen": seen, "kv_entries": float(seen), "kv_bytes": nbytes, "kv_bytes_full": nbytes, "compressed": False}


def make_cache(method: str, config: CompressionConfig | ClusterGenConfig | None):
    if method == "full":
        return DynamicCache()
    if method in COMPRESSORS:
        settings = config if isinstance(config, CompressionConfig) else CompressionConfig()
        return ClusteredCache(settings, compressor=COMPRESSORS[method])
    if method == "clustergen":
        return ClusteredCache(config if isinstance(config, ClusterGenConfig) else ClusterGenConfig())
    raise ChelseaError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")


def use_method(model, method: str) -> None:
    """Switch ``model`` to the attention ``method`` needs: SDPA for ``full``, "chelsea" for the rest."""
    if method != "full":
        register()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        model.set_attn_implementation("sdpa")


def generate(
    model,
    tokenizer,
    inputs: dict,
    *,
    method: str = "chelsea",
    config: CompressionConfig | ClusterGenConfig | None = None,
    max_new_tokens: int = 32,
) -> GenerationResult:
    """Greedy generation of one prompt (batch of 1) with the chosen cache; returns answer and stats.

    ``full`` runs the model's plain SDPA attention with a ``DynamicCache`` (the reference); the
    other methods (``chelsea``, the eviction baselines ``streaming``, ``h2o``, ``snapkv``, ``random``, ``knorm``, and
    ``clustergen``) run the "chelsea" attention with a :class:`ClusteredCache`.
    ``ratio`` in the result is the setting for the ratio-based methods, 0 for ``full`` and ``None`` for
    ``clustergen`` (whose memory follows from its settings; see ``kv_bytes``).
    """
    if max_new_tokens < 1:
        raise ChelseaError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    cache = make_cache(method, config)
    check_model_config(model.config)
    prompt_tokens = inputs["input_ids"].shape[1]
    check_prompt_length(model.config, prompt_tokens, max_new_tokens)
    use_method(model, method)
    device = model.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    clock = _FirstTokenClock(device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            stopping_criteria=[clock],
            pad_token_id=tokenizer.pad_token_id,
        )
    _sync(device)
    end = time.perf_counter()
    new = out[0, prompt_tokens:]
    stats = cache_stats(cache)
    return GenerationResult(
        answer=tokenizer.decode(new, skip_special_tokens=True).strip(),
        method=method,
        ratio=0.0 if method == "full" else getattr(cache.config, "ratio", None),
        tokens_seen=stats["tokens_seen"],
        prompt_tokens=prompt_tokens,
        new_tokens=int(new.shape[0]),
        kv_entries=stats["kv_entries"],
        kv_bytes=stats["kv_bytes"],
        kv_bytes_full=stats["kv_bytes_full"],
        compressed=stats["compressed"],
        prefill_s=round(clock.first - start, 4),
        decode_s=round(end - clock.first, 4),
        tokens=new.tolist(),
    )
