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

from ..attention import ATTN_IMPLEMENTATION, register
from ..cache import ClusteredCache
from ..compat import cache_arg
from ..errors import ChelseaError
from ..methods import Method, get_method, method_names
from ..models import check_model_config, check_prompt_length
from ..scoring import compress_context
from ..settings import CompressionConfig


def method_choices() -> tuple[str, ...]:
    """What ``--method`` takes: ``full`` (the uncompressed cache) and every registered method."""
    return ("full", *method_names())


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
    settings: dict | None = None  # the method's settings (None for the full cache)

    def to_dict(self) -> dict:
        return asdict(self)


class _FirstTokenClock(StoppingCriteria):
    """Notes the time at which ``generate`` has produced its first new token; never stops it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.first is None:
            sync(self.device)
            self.first = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock times cover it."""
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


def make_cache(method: str | Method, config: CompressionConfig | None = None):
    """A ``DynamicCache`` for ``"full"``, else a :class:`ClusteredCache` of ``method`` (a name or a
    :class:`Method` with its settings) and the shared ``config``."""
    if method == "full":
        return DynamicCache()
    return ClusteredCache(config or CompressionConfig(), method=get_method(method))


def prefill(model, input_ids: torch.Tensor, cache, *, attention_mask: torch.Tensor | None = None,
            micro_batch: int | None = None) -> torch.Tensor:
    """The prompts' forward pass into ``cache``; returns the last position's logits ``[batch, 1, vocab]``.

    With ``micro_batch`` (a :class:`ClusteredCache` of Chelsea, ``full`` as ``ratio=0`` or an
    eviction method), the rows go through the model ``micro_batch`` at a time, each group into an
    empty cache of the same settings whose entries are then copied into its rows of ``cache``.
    The results are those of one pass (rows never interact), but the peak memory is one group's
    activations and uncompressed keys and values, not the whole batch's: with a compressing
    method far larger batches fit.
    """
    batch = input_ids.shape[0]
    if micro_batch is not None and micro_batch < 1:
        raise ChelseaError(f"the prefill micro-batch must be at least 1 row; got {micro_batch}")
    if micro_batch is None or micro_batch >= batch:
        return model(input_ids, attention_mask=attention_mask, **cache_arg(model, cache), use_cache=True, logits_to_keep=1).logits
    if not isinstance(cache, ClusteredCache):
        raise ChelseaError("a micro-batched prefill needs a ClusteredCache (use ClusteredCache(ratio=0.0) for a full cache)")
    if any(layer.is_initialized for layer in cache.layers):
        raise ChelseaError("a micro-batched prefill starts from an empty cache")
    logits = []
    for start in range(0, batch, micro_batch):
        rows = slice(start, start + micro_batch)
        part = cache.empty_like()
        mask = None if attention_mask is None else attention_mask[rows]
        logits.append(model(input_ids[rows], attention_mask=mask, **cache_arg(model, part), use_cache=True, logits_to_keep=1).logits)
        cache.take_rows(part, start, batch)
        del part
    return torch.cat(logits)


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
    method: str | Method = "chelsea",
    config: CompressionConfig | None = None,
    max_new_tokens: int = 32,
    cuda_graph: bool | None = None,
) -> GenerationResult:
    """Greedy generation of one prompt (batch of 1) with the chosen cache; returns answer and stats.

    ``full`` runs the model's plain SDPA attention with a ``DynamicCache`` (the reference); every
    registered method (a name or a :class:`Method` with its settings) runs the "chelsea" attention
    with a :class:`ClusteredCache`. Methods that rank by importance (``chelsea``, ``kvzip``) score
    the prompt first (:func:`chelsea.scoring.compress_context`; its time counts as prefill).
    ``ratio`` in the result is the shared setting for the methods that take it, 0 for ``full`` and
    ``None`` for the others (``clustergen``, whose memory follows from its settings; see ``kv_bytes``).

    ``cuda_graph`` (default: on when the model sits on one CUDA device): Chelsea and the eviction
    methods decode through :class:`chelsea.runtime.decoding.GraphDecoder`, each step replayed from a CUDA
    graph, instead of ``model.generate`` (the same greedy tokens). Models whose generation config
    asks for more than the argmax (a repetition penalty, banned n-grams) always use ``model.generate``.
    """
    if max_new_tokens < 1:
        raise ChelseaError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    cache = make_cache(method, config)
    check_model_config(model.config)
    prompt_tokens = inputs["input_ids"].shape[1]
    check_prompt_length(model.config, prompt_tokens, max_new_tokens)
    use_method(model, method)
    name = "full" if method == "full" else cache.method.name
    device = model.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    cuda_graph = _use_cuda_graph(model, cuda_graph)
    if cuda_graph and name != "full" and cache.method.layer == "clustered" and _plain_greedy(model.generation_config):
        return _generate_graphed(model, tokenizer, inputs, name, cache, max_new_tokens)
    clock = _FirstTokenClock(device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        if name != "full" and cache.method.scores == "importance" and prompt_tokens > 1:
            # Score and compress all but the last prompt token; generate reads that one.
            mask = inputs.get("attention_mask")
            compress_context(model, cache, inputs["input_ids"][:, :-1], tokenizer, attention_mask=None if mask is None else mask[:, :-1],
                             question=True)
        out = model.generate(
            **inputs,
            **cache_arg(model, cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            stopping_criteria=[clock],
            pad_token_id=tokenizer.pad_token_id,
        )
    sync(device)
    end = time.perf_counter()
    return _result(tokenizer, name, cache, prompt_tokens, out[0, prompt_tokens:], clock.first - start, end - clock.first)


def _result(tokenizer, method, cache, prompt_tokens, new, prefill_s, decode_s) -> GenerationResult:
    stats = cache_stats(cache)
    return GenerationResult(
        answer=tokenizer.decode(new, skip_special_tokens=True).strip(),
        method=method,
        ratio=0.0 if method == "full" else cache.config.ratio if cache.method.takes_ratio else None,
        tokens_seen=stats["tokens_seen"],
        prompt_tokens=prompt_tokens,
        new_tokens=int(new.shape[0]),
        kv_entries=stats["kv_entries"],
        kv_bytes=stats["kv_bytes"],
        kv_bytes_full=stats["kv_bytes_full"],
        compressed=stats["compressed"],
        prefill_s=round(prefill_s, 4),
        decode_s=round(decode_s, 4),
        tokens=new.tolist(),
        settings=None if method == "full" else cache.method.to_dict(),
    )


def _use_cuda_graph(model, requested: bool | None) -> bool:
    """Whether to replay decoding steps from CUDA graphs: ``requested``, or by default when the
    model sits on one CUDA device (no tensor parallelism, not spread by a device map)."""
    from ..models import world_size

    devices = set(getattr(model, "hf_device_map", {"": model.device}).values())
    one_device = model.device.type == "cuda" and world_size() == 1 and len(devices) == 1
    if requested and not one_device:
        raise ChelseaError("--cuda-graphs needs the model on one CUDA device (no tensor parallelism or --device-map); use --no-cuda-graphs")
    return one_device if requested is None else requested


def _plain_greedy(generation_config) -> bool:
    """Whether greedy decoding under ``generation_config`` is the plain argmax of the logits."""
    return (generation_config.repetition_penalty in (None, 1.0) and not generation_config.no_repeat_ngram_size
            and generation_config.bad_words_ids is None and generation_config.suppress_tokens is None
            and generation_config.begin_suppress_tokens is None and not generation_config.min_new_tokens
            and not generation_config.min_length)


def _generate_graphed(model, tokenizer, inputs, method, cache, max_new_tokens) -> GenerationResult:
    """Greedy generation of one prompt: prefill, then steps replayed by a :class:`GraphDecoder`
    until ``max_new_tokens`` or an end-of-sequence token."""
    from .decoding import GraphDecoder

    device = model.device
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = compress_context(model, cache, inputs["input_ids"], tokenizer, attention_mask=inputs.get("attention_mask"),
                                  question=True)
        token = logits[:, -1:].argmax(-1)
        tokens = [int(token)]
        first = time.perf_counter()
        if max_new_tokens > 1 and tokens[0] not in eos:
            with GraphDecoder(model, cache, token, headroom=max(max_new_tokens, 16)) as decoder:
                while len(tokens) < max_new_tokens and tokens[-1] not in eos:
                    tokens.append(int(decoder.step()))
    sync(device)
    end = time.perf_counter()
    new = torch.tensor(tokens)
    return _result(tokenizer, method, cache, inputs["input_ids"].shape[1], new, first - start, end - first)
