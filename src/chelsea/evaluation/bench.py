"""Speed and memory of whole-model prefill and decoding, full cache vs compressed caches.

Models are either built-in/real (``smollm2-135m``, any id or path) or architecture presets with
random weights (``llama3-8b``, ``mistral-7b``, ``qwen2.5-7b``): right for speed and memory, never
for accuracy. Prompts are random token ids. For each configuration:

- ``prefill_s``: the prompts' forward pass (``logits_to_keep=1``), scoring and clustering
  included, eager even when the layers are fused. ``chelsea`` and ``kvzip`` score as ``chelsea
  generate`` does, by context reconstruction (:func:`chelsea.scoring.compress_context`), when
  a tokenizer is at hand (a real model's own; a preset's from ``tokenizer``) and the prompts are
  prefilled at once; otherwise by the prompt's last queries. ``scoring`` in each record says
  which (``null`` for methods that do not score); ``prefill_vs_full`` is ``prefill_s`` over the
  full cache's, same context and batch; with ``prefill_batch`` (in each record) the prompts go
  through that many at a time and their entries are copied into one cache
  (:func:`chelsea.runtime.prefill`);
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
  CUDA graph (:class:`chelsea.runtime.GraphDecoder`), so host work does not hide the memory
  traffic. ``full`` is then the uncompressed cache in the same preallocated buffers, read by the
  same Triton kernel, so the speed-up measures what storing fewer entries buys. With ``fused``
  (the default there) the decoder layers are compiled (:func:`chelsea.runtime.fuse_layers`).
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
import statistics
import platform
import time
from datetime import datetime, timezone

import torch

from ..attention import ATTN_IMPLEMENTATION, register
from ..compat import cache_arg
from ..errors import ChelseaError
from ..methods import METHODS, configure
from ..models import PRESETS, fit_vocabulary, load_model, load_preset_or_model, world_size
from ..runtime import GraphDecoder, cache_stats, fuse_layers, make_cache, sync
from ..runtime import prefill as prefill_cache
from ..scoring import compress_context
from ..settings import CompressionConfig

WARMUP_STEPS = 5


def _bench_cache(model, method: str, ratio: float, static_full: bool, max_len: int, settings: dict | None):
    """The cache a configuration runs with: transformers' ``StaticCache`` for the eager full
    cache, the uncompressed ``ClusteredCache`` (same buffers and kernel) for the graphed one, or
    the method's cache."""
    if static_full:
        # The fair full cache for eager steps: preallocated, written in place (transformers' StaticCache).
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=max_len)
    if method == "full":
        return make_cache("chelsea-paper", CompressionConfig(ratio=0.0))
    return make_cache(configure(method, settings or {}), CompressionConfig(ratio=ratio or 0.0))


def _timed_decode(model, cache, token, steps: int, cuda_graph: bool) -> float:
    """Seconds per decoding step of ``steps`` steps, after :data:`WARMUP_STEPS` untimed ones."""
    device = model.device
    decoder = None
    if cuda_graph:  # room for every step, so no re-pin happens while timing
        decoder = GraphDecoder(model, cache, token, cuda_graph=True, headroom=WARMUP_STEPS + steps + 1)
        step = decoder.step
    else:
        def step():
            nonlocal token
            token = model(token, **cache_arg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    for _ in range(WARMUP_STEPS):  # not timed; the CUDA graph is recorded here
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    if decoder is not None:
        decoder.close()
    return (time.perf_counter() - start) / steps


def run_one(model, method: str, ratio: float, context: int, batch: int, decode_tokens: int = 32, seed: int = 0,
            cuda_graph: bool = False, prefill_batch: int | None = None, fused: bool = False, tokenizer=None,
            settings: dict | None = None) -> dict:
    """Prefill ``batch`` random prompts of ``context`` tokens (``prefill_batch`` rows at a time),
    then decode; returns one record. ``fused`` only labels the record: whether the caller compiled
    the decoder layers (:func:`chelsea.runtime.fuse_layers`); the prefill runs eagerly anyway.
    ``tokenizer``: the importance-ranked methods score by context reconstruction (it writes the
    repeat prompt) instead of the last queries, when the prompts are prefilled at once.
    ``settings``: the method settings to use (those the method has)."""
    device = model.device
    gc.collect()  # the previous configuration's cache and graph, before measuring this one's memory
    cuda_graph = cuda_graph and (method == "full" or METHODS[method].layer == "clustered")
    static_full = method == "full" and not cuda_graph
    if static_full and prefill_batch is not None and prefill_batch < batch:
        raise ChelseaError("--prefill-batch needs CUDA graphs (the full cache is then a ClusteredCache); "
                           "with --no-cuda-graphs the full cache is transformers' StaticCache, prefilled at once")
    register()
    model.set_attn_implementation("sdpa" if static_full else ATTN_IMPLEMENTATION)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(seed)).to(device)
    cache = _bench_cache(model, method, ratio, static_full, context + decode_tokens + 8, settings)
    scoring = None
    if method != "full" and cache.method.scores == "importance":
        whole = prefill_batch is None or prefill_batch >= batch
        scoring = "last queries"
        if tokenizer is not None and whole:
            scoring = "learned" if cache.method.scoring.importance == "learned" else "reconstruction"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        with torch.compiler.set_stance("force_eager"):
            if scoring in ("reconstruction", "learned"):
                logits = compress_context(model, cache, ids, tokenizer)
            else:
                logits = prefill_cache(model, ids, cache, micro_batch=prefill_batch)
        sync(device)
        prefill = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        del logits
        decode = _timed_decode(model, cache, token, decode_tokens, cuda_graph)
    return _record(model, cache, method, ratio, context, batch, cuda_graph, fused, prefill_batch, prefill, scoring, decode)


def _record(model, cache, method, ratio, context, batch, cuda_graph, fused, prefill_batch, prefill, scoring, decode) -> dict:
    device = model.device
    stats = cache_stats(cache)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "method": method,
        "ratio": 0.0 if method == "full" else ratio if METHODS[method].takes_ratio else None,
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


def _setup(model_name, device, dtype, device_map, tokenizer, cuda_graph, fuse, prefill_batch):
    """``(model, tokenizer, cuda_graph, fuse)``: the model loaded (a preset or a real one), the
    tokenizer to score with (``None`` for a preset without one), the defaults decided and checked."""
    from transformers import AutoTokenizer

    if model_name in PRESETS:
        model = load_preset_or_model(model_name, device, dtype, device_map)
        words = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
        model = fit_vocabulary(model, words) if words is not None else model
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
        fuse_layers(model)
    return model, words, cuda_graph, fuse


def run(model_name: str, methods: list[str], ratios: list[float], contexts: list[int], batches: list[int],
        decode_tokens: int = 32, device: str = "auto", dtype: str = "auto", progress=print,
        device_map: str | None = None, max_batch: int | None = None, cuda_graph: bool | None = None,
        fuse: bool | None = None, prefill_batch: int | None = None, tokenizer: str | None = None,
        settings: dict | None = None, repeats: int = 1, answer_tokens: int = 256) -> list[dict]:
    """Every (context, batch, method, ratio); a configuration that runs out of memory is recorded as such.

    With ``max_batch`` (the search's upper limit) ``batches`` is ignored and the largest batch that
    fits is searched for each (context, method, ratio) instead. ``cuda_graph`` (default: on a
    single CUDA device) replays decoding steps from CUDA graphs; ``fuse`` (default: with CUDA
    graphs) compiles the decoder layers for them (:func:`chelsea.runtime.fuse_layers`);
    ``prefill_batch`` prefills that many rows at a time (default: the whole batch).
    ``tokenizer``: a tokenizer folder for a preset (which has none), so ``chelsea`` and ``kvzip``
    score by context reconstruction as they do outside the benchmark; a real model uses its own.
    ``repeats``: measurements per configuration (medians reported, every run kept); ``answer_tokens``:
    the answer length of ``end_to_end_s``.
    """
    if "full" not in methods:
        methods = ["full", *methods]
    model, words, cuda_graph, fuse = _setup(model_name, device, dtype, device_map, tokenizer, cuda_graph, fuse, prefill_batch)

    def one(method, ratio, context, batch, tokens=decode_tokens):
        return run_one(model, method, ratio, context, batch, tokens, cuda_graph=cuda_graph, prefill_batch=prefill_batch, fused=fuse,
                       tokenizer=words, settings=settings)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None:
        longest = limit - decode_tokens - 2  # the decoded tokens (and one spare each side) need room
        too_long = [c for c in contexts if c > longest]
        if too_long:
            raise ChelseaError(f"--contexts {too_long[0]} leaves no room for {decode_tokens} decoded tokens in {model_name}'s "
                               f"context of {limit} tokens: use at most {longest}")
    # One small untimed run of each method first: kernels compile and the allocator grows there,
    # not inside the first timed configuration.
    for method in methods:
        one(method, _settings(method, ratios)[0], min(contexts[0], 1024), 1, 4)
    for scorer in model.__dict__.get("_chelsea_learned", {}).values():  # fitted in the warm-up, if a method uses one
        progress(f"learned scorer: {scorer.metrics}")

    records = []
    device_name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or "cpu"
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def base() -> dict:
        return {"device": device_name, "model": model_name, "date": stamp, "world_size": world_size(), "device_map": device_map}

    for context in contexts:
        if max_batch is not None:
            records += _search(one, methods, ratios, context, max_batch, base(), progress)
            continue
        for batch in batches:
            records += _batch_records(one, methods, ratios, context, batch, base(), progress, repeats, answer_tokens)
    return records


def _repeated(one, method, ratio, context: int, batch: int, repeats: int) -> dict:
    """``repeats`` measurements of one configuration: the medians, and every run's times."""
    runs = [one(method, ratio, context, batch) for _ in range(repeats)]
    if repeats == 1:
        return runs[0]
    record = dict(runs[len(runs) // 2])
    record["prefill_s"] = statistics.median(r["prefill_s"] for r in runs)
    record["decode_ms_per_token"] = statistics.median(r["decode_ms_per_token"] for r in runs)
    record["prefill_runs_s"] = [r["prefill_s"] for r in runs]
    record["decode_runs_ms"] = [r["decode_ms_per_token"] for r in runs]
    record["tokens_per_s"] = round(batch * 1000 / record["decode_ms_per_token"], 1)
    return record


def _batch_records(one, methods, ratios, context: int, batch: int, base: dict, progress, repeats: int = 1,
                   answer_tokens: int = 256) -> list[dict]:
    """Every method and ratio at one context and batch, each against the full cache measured first
    (``repeats`` times each, the median kept); ``end_to_end_s`` is the prefill plus
    ``answer_tokens`` decoding steps."""
    records, full_ms, full_prefill = [], None, None
    for method in methods:
        for ratio in _settings(method, ratios):
            try:
                record = {**base, **_repeated(one, method, ratio, context, batch, repeats)}
                record["end_to_end_s"] = round(record["prefill_s"] + answer_tokens * record["decode_ms_per_token"] / 1000, 4)
                record["answer_tokens"] = answer_tokens
            except torch.OutOfMemoryError:
                record = {**base, "method": method, "ratio": ratio, "context": context, "batch": batch, "error": "out of memory"}
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
    return [0.0] if method == "full" else ratios if METHODS[method].takes_ratio else [None]


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
