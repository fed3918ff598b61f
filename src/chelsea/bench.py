"""Speed and memory of whole-model prefill and decoding, full cache vs compressed caches.

Models are either built-in/real (``smollm2-135m``, any id or path) or architecture presets with
random weights (``llama3-8b``, ``mistral-7b``, ``qwen2.5-7b``): right for speed and memory, never
for accuracy. Prompts are random token ids. For each configuration:

- ``prefill_s``: the prompts' forward pass (``logits_to_keep=1``), scoring and clustering
  included, eager even when the layers are fused. ``chelsea`` and ``kvzip`` score as ``chelsea
  generate`` does, by context reconstruction (:func:`chelsea.importance.compress_context`), when
  a tokenizer is at hand (a real model's own; a preset's from ``tokenizer``) and the prompts are
  prefilled at once; otherwise by the prompt's last queries. ``scoring`` in each record says
  which (``null`` for methods that do not score); ``prefill_vs_full`` is ``prefill_s`` over the
  full cache's, same context and batch; with ``prefill_batch`` (in each record) the prompts go
  through that many at a time and their entries are copied into one cache
  (:func:`chelsea.generation.prefill`);
- ``decode_ms_per_token``: wall time of ``decode_tokens`` greedy steps (the whole batch each),
  divided by their number, after 5 untimed steps; periodic re-clustering is included. Before the
  first configuration, every method runs once untimed on a short prompt (compilation, allocator);
- ``peak_mem_bytes``: CUDA peak allocated memory over prefill and decoding (0 on the CPU);
- ``kv_bytes``: what the cache holds at the end; ``kv_bytes_full`` what a full cache holds;
- ``speedup_vs_full``: full cache's decode time over this one's, same model, context and batch;
- ``bandwidth_limit_speedup``: (weights + full KV bytes) / (weights + stored KV bytes), the
  speed-up if decoding were bound by reading weights and cache once per step.

Two ways of decoding (``cuda_graph`` in each record):

- ``cuda_graph: true`` (the default on one CUDA device): every decoding step is replayed from a
  CUDA graph (:class:`chelsea.decoding.GraphDecoder`), so host work does not hide the memory
  traffic. ``full`` is then the uncompressed cache in the same preallocated buffers, read by the
  same Triton kernel, so the speed-up measures what storing fewer entries buys. With ``fused``
  (the default there) the decoder layers are compiled (:func:`chelsea.decoding.fuse_layers`).
- ``cuda_graph: false``: ordinary eager steps through transformers. ``full`` is transformers'
  ``StaticCache`` (preallocated, written in place) with PyTorch SDPA, the fastest full cache
  transformers offers without compiling; ClusterGen always decodes this way.

With ``max_batch`` the batch sizes are not given but searched: for each context, method and ratio
the largest batch that runs without running out of GPU memory (doubling, then bisection), with
its record (``search: "largest_batch"``) and ``throughput_vs_full``, its tokens per second over
the full cache's at the full cache's own largest batch.
"""

from __future__ import annotations

from collections.abc import Callable

import gc
import os
import platform
import time
from datetime import datetime, timezone

import torch

from .config import CompressionConfig
from .compat import cache_arg
from .errors import ChelseaError
from .generation import _sync, cache_stats, make_cache
from .generation import prefill as prefill_cache

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
        return load_bench_model(name), AutoTokenizer.from_pretrained(tokenizer)
    from .models import load_model

    model, own = load_model(name)
    return model, AutoTokenizer.from_pretrained(tokenizer) if tokenizer else own


def load_bench_model(name: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None):
    """A preset with random weights, or a real model through :func:`chelsea.models.load_model`.

    Under tensor parallelism (or with ``device_map``) a preset is first saved once, with random
    weights, to ``<cache dir>/presets/<name>`` by rank 0 and then loaded like any local model, so
    transformers shards it by its own plan.
    """
    from .models import cache_dir, load_model, pick_device, pick_dtype, world_size

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


WARMUP_STEPS = 5


def run_one(model, method: str, ratio: float, context: int, batch: int, decode_tokens: int = 32, seed: int = 0,
            cuda_graph: bool = False, prefill_batch: int | None = None, fused: bool = False, tokenizer=None) -> dict:
    """Prefill ``batch`` random prompts of ``context`` tokens (``prefill_batch`` rows at a time),
    then decode; returns one record. ``fused`` only labels the record: whether the caller compiled
    the decoder layers (:func:`chelsea.decoding.fuse_layers`); the prefill runs eagerly anyway.
    ``tokenizer``: the importance-ranked methods score by context reconstruction (it writes the
    repeat prompt) instead of the last queries, when the prompts are prefilled at once."""
    from .importance import compress_context
    from .attention import ATTN_IMPLEMENTATION, register
    from .decoding import GraphDecoder

    device = model.device
    gc.collect()  # the previous configuration's cache and graph, before measuring this one's memory
    cuda_graph = cuda_graph and method != "clustergen"
    static_full = method == "full" and not cuda_graph
    register()
    model.set_attn_implementation("sdpa" if static_full else ATTN_IMPLEMENTATION)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)
    if static_full and prefill_batch is not None and prefill_batch < batch:
        raise ChelseaError("--prefill-batch needs CUDA graphs (the full cache is then a ClusteredCache); "
                           "with --no-cuda-graphs the full cache is transformers' StaticCache, prefilled at once")
    if static_full:
        # The fair full cache for eager steps: preallocated, written in place (transformers' StaticCache).
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=context + decode_tokens + 8)
    elif method == "full":  # graphed: the uncompressed cache in the buffers and kernel the methods use
        cache = make_cache("chelsea-paper", CompressionConfig(ratio=0.0))
    else:
        cache = make_cache(method, CompressionConfig(ratio=ratio) if method != "clustergen" else None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        scoring = None
        if getattr(cache, "scores_importance", False):
            whole = prefill_batch is None or prefill_batch >= batch
            scoring = "reconstruction" if tokenizer is not None and whole else "last queries"
        with torch.compiler.set_stance("force_eager"):
            if scoring == "reconstruction":
                logits = compress_context(model, cache, ids, tokenizer)
            else:
                logits = prefill_cache(model, ids, cache, micro_batch=prefill_batch)
        _sync(device)
        prefill = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        del logits
        if cuda_graph:
            # Room for every step, so no re-pin happens while timing.
            decoder = GraphDecoder(model, cache, token, cuda_graph=True, headroom=WARMUP_STEPS + decode_tokens + 1)
            step = decoder.step
        else:
            def step():
                nonlocal token
                token = model(token, **cache_arg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        for _ in range(WARMUP_STEPS):  # not timed; the CUDA graph is recorded here
            step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            step()
        _sync(device)
        decode = (time.perf_counter() - start) / decode_tokens
        if cuda_graph:
            decoder.close()
    stats = cache_stats(cache)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "method": method,
        "ratio": 0.0 if method == "full" else None if method == "clustergen" else ratio,
        "context": context,
        "batch": batch,
        "cuda_graph": cuda_graph,
        "fused": fused,
        "prefill_batch": min(prefill_batch or batch, batch),
        "prefill_s": round(prefill, 4),
        "scoring": scoring,
        "decode_ms_per_token": round(decode * 1e3, 3),
        "tokens_per_s": round(batch / decode, 1),
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "kv_bytes": stats["kv_bytes"],
        "kv_bytes_full": stats["kv_bytes_full"],
        "weights_bytes": weights,
        "bandwidth_limit_speedup": round((weights + stats["kv_bytes_full"]) / (weights + stats["kv_bytes"]), 3),
    }


def largest_batch(try_batch: Callable[[int], dict | None], limit: int = 1024) -> tuple[int, dict | None]:
    """The largest batch in ``[1, limit]`` for which ``try_batch`` returns a record (``None``: did
    not fit), with that record. Doubling from 1, then bisection; assumes that whatever fits, every
    smaller batch fits too. Returns ``(0, None)`` when not even one sequence fits."""
    best, record, failed = 0, None, limit + 1
    batch = 1
    while batch <= limit:
        result = try_batch(batch)
        if result is None:
            failed = batch
            break
        best, record = batch, result
        if batch == limit:
            return best, record
        batch = min(2 * batch, limit)
    while failed - best > 1:
        mid = (best + failed) // 2
        result = try_batch(mid)
        if result is None:
            failed = mid
        else:
            best, record = mid, result
    return best, record


def run(model_name: str, methods: list[str], ratios: list[float], contexts: list[int], batches: list[int],
        decode_tokens: int = 32, device: str = "auto", dtype: str = "auto", progress=print,
        device_map: str | None = None, max_batch: int | None = None, cuda_graph: bool | None = None,
        fuse: bool | None = None, prefill_batch: int | None = None, tokenizer: str | None = None) -> list[dict]:
    """Every (context, batch, method, ratio); a configuration that runs out of memory is recorded as such.

    With ``max_batch`` (the search's upper limit) ``batches`` is ignored and the largest batch that
    fits is searched for each (context, method, ratio) instead. ``cuda_graph`` (default: on a
    single CUDA device) replays decoding steps from CUDA graphs; ``fuse`` (default: with CUDA
    graphs) compiles the decoder layers for them (:func:`chelsea.decoding.fuse_layers`);
    ``prefill_batch`` prefills that many rows at a time (default: the whole batch).
    ``tokenizer``: a tokenizer folder for a preset (which has none), so ``chelsea`` and ``kvzip``
    score by context reconstruction as they do outside the benchmark; a real model uses its own.
    """
    if "full" not in methods:
        methods = ["full", *methods]
    from transformers import AutoTokenizer

    from .models import load_model, world_size

    if model_name in PRESETS:
        model = load_bench_model(model_name, device, dtype, device_map)
        words = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    else:
        model, words = load_model(model_name, device=device, dtype=dtype, device_map=device_map)
        words = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else words

    single = model.device.type == "cuda" and world_size() == 1 and device_map is None
    if cuda_graph is None:
        cuda_graph = single
    elif cuda_graph and not single:
        raise ChelseaError("--cuda-graphs needs the model on one CUDA device (no tensor parallelism or --device-map); use --no-cuda-graphs")
    if fuse is None:
        fuse = cuda_graph
    elif fuse and not cuda_graph:
        raise ChelseaError("--fuse compiles the decoding step that CUDA graphs replay; it needs --cuda-graphs")
    if prefill_batch is not None and prefill_batch < 1:
        raise ChelseaError(f"--prefill-batch must be at least 1; got {prefill_batch}")
    if fuse:
        from .decoding import fuse_layers

        fuse_layers(model)

    def one(method, ratio, context, batch, tokens=decode_tokens):
        return run_one(model, method, ratio, context, batch, tokens, cuda_graph=cuda_graph, prefill_batch=prefill_batch, fused=fuse,
                       tokenizer=words)
    limit = getattr(model.config, "max_position_embeddings", None)
    # One small untimed run of each method first: kernels compile and the allocator grows there,
    # not inside the first timed configuration.
    for method in methods:
        one(method, _settings(method, ratios)[0], min(contexts[0], 1024), 1, 4)

    records = []
    device_name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or "cpu"
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def base() -> dict:
        return {"device": device_name, "model": model_name, "date": stamp, "world_size": world_size(), "device_map": device_map}

    for context in contexts:
        if limit is not None and context + decode_tokens + 2 > limit:
            raise ChelseaError(f"--contexts {context} exceeds {model_name}'s context of {limit} tokens")
        if max_batch is not None:
            records += _search(one, methods, ratios, context, max_batch, base(), progress)
            continue
        for batch in batches:
            full_ms = full_prefill = None
            for method in methods:
                for ratio in _settings(method, ratios):
                    try:
                        record = {**base(), **one(method, ratio, context, batch)}
                    except torch.OutOfMemoryError:
                        record = {**base(), "method": method, "ratio": ratio, "context": context, "batch": batch, "error": "out of memory"}
                        torch.cuda.empty_cache()
                    if method == "full":
                        full_ms, full_prefill = record.get("decode_ms_per_token"), record.get("prefill_s")
                    if "decode_ms_per_token" in record:
                        record["speedup_vs_full"] = round(full_ms / record["decode_ms_per_token"], 3) if full_ms else None
                        record["prefill_vs_full"] = round(record["prefill_s"] / full_prefill, 3) if full_prefill else None
                    records.append(record)
                    progress(record)
    return records


def _settings(method: str, ratios: list[float]) -> list[float | None]:
    """The ratios a method runs at: 0 for the full cache, its own settings (``None``) for clustergen."""
    return [0.0] if method == "full" else [None] if method == "clustergen" else ratios


def _search(one, methods, ratios, context, limit, base, progress) -> list[dict]:
    """Largest fitting batch and its record for every method and ratio at one context
    (``one(method, ratio, context, batch)`` measures one configuration)."""

    def attempt(method, ratio):
        def try_batch(batch):
            try:
                return one(method, ratio, context, batch)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                return None

        return try_batch

    records, full_tps = [], None
    for method in methods:
        for ratio in _settings(method, ratios):
            batch, record = largest_batch(attempt(method, ratio), limit)
            if record is None:
                record = {"method": method, "ratio": ratio, "context": context, "batch": 0, "error": "out of memory at batch 1"}
            record = {**base, **record, "search": "largest_batch", "batch_limit": limit}
            if method == "full":
                full_tps = record.get("tokens_per_s")
            if "tokens_per_s" in record and full_tps:
                record["throughput_vs_full"] = round(record["tokens_per_s"] / full_tps, 3)
            records.append(record)
            progress(record)
    return records
