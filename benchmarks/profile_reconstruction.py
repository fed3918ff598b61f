"""Where the time of one ``compress_context`` goes, on the GPU, one sequence: the wall time of
each phase (prefill, fact-head lookup, the reconstruction repeat, the layer budgets, the fact-head
ranks, the clustering; CUDA-synchronised around each), then torch.profiler's operators by their
CUDA time.

    python benchmarks/profile_reconstruction.py --method chelsea --tokenizer .gpu/qwen-tokenizer > profile.txt

``--model`` is a preset of ``chelsea bench`` (random weights: right for timing only) or a model
name; a preset needs ``--tokenizer``, a folder with a chat template (for the repeat prompt). One
warm-up call (it also calibrates the fact heads), then ``--repeats`` timed calls (the phase table
is their median) and one profiled call (of one phase alone with ``--phase``). ``--json`` writes
the phase table. Several ``--set`` settings are timed one after the other in one process (one
column each); ``--plain`` adds the plain prefill, so each total is also given as a multiple of it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import time
import warnings
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from transformers import DynamicCache

import chelsea.cache.cache as cache_module
import chelsea.scoring.context as context
from chelsea import CompressionConfig, compress_context
from chelsea.compat import cache_arg
from chelsea.methods import configure
from chelsea.models import load_with_tokenizer
from chelsea.runtime import make_cache, use_method

PHASES = {  # phase -> (module, function) timed around every call
    "fact-head lookup": (context, "find_fact_heads"),
    "reconstruction repeat": (context, "score_by_reconstruction"),
    "layer budgets": (context, "split_budgets"),
    "fact-head ranks": (context, "rank_by_fact_heads"),
    "clustering": (cache_module, "compress_together"),
}


def _timed(spent: dict, name: str, fn, only: dict):
    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if only.get("phase") == name and only.get("on"):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                out = fn(*args, **kwargs)
                torch.cuda.synchronize()
            only["profiles"].append(prof)
        else:
            out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        spent[name] += time.perf_counter() - start
        return out
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--tokenizer", help="tokenizer folder (needed with a preset)")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--method", default="chelsea", choices=["kvzip", "chelsea"])
    parser.add_argument("--importance", default="local", choices=["local", "full"])
    parser.add_argument("--repeat-depth", default="facts", choices=["facts", "all"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="operators to print (0: no profiled call)")
    parser.add_argument("--json", help="write the phase table here")
    parser.add_argument("--set", action="append", help="other settings of the method (JSON values), e.g. "
                        "'repeat_chunk=1024,surprise_weight=0'; repeat for several settings, each timed in turn (the profile and "
                        "--syncs take the last)")
    parser.add_argument("--plain", action="store_true", help="also time the plain prefill (SDPA, DynamicCache) and print each total over it")
    parser.add_argument("--batch-tokens", type=int, help="repeat tokens per forward (score_by_reconstruction's batch_tokens)")
    parser.add_argument("--phase", choices=list(PHASES), help="profile only this phase's operators")
    parser.add_argument("--syncs", action="store_true",
                        help="one more call under torch.cuda.set_sync_debug_mode('warn'): print where the host waited for the GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this profile is of the GPU path: run it on a CUDA machine")
    model, tokenizer = load_with_tokenizer(args.model, args.tokenizer)
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
    if args.batch_tokens:
        context.score_by_reconstruction = functools.partial(context.score_by_reconstruction, batch_tokens=args.batch_tokens)
    spent: dict[str, float] = defaultdict(float)
    only = {"phase": args.phase, "on": False, "profiles": []}
    for name, (module, attr) in PHASES.items():
        setattr(module, attr, _timed(spent, name, getattr(module, attr), only))

    settings = [{k: json.loads(v) for k, v in (item.split("=", 1) for item in spec.split(",") if item)} for spec in args.set or [""]]
    def method(knobs: dict):
        return configure(args.method, {"importance": args.importance, "repeat_depth": args.repeat_depth, **knobs})

    for knobs in settings:
        method(knobs)  # bad settings fail before anything runs

    def once(knobs: dict) -> float:
        cache = make_cache(method(knobs), CompressionConfig(ratio=0.8))
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            compress_context(model, cache, ids, tokenizer)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    plain = statistics.median([plain_prefill(model, ids) for _ in range(args.repeats + 1)][1:]) if args.plain else None  # after a warm-up
    use_method(model, args.method)
    tables = []
    for knobs in settings:
        once(knobs)
        runs = []
        for _ in range(args.repeats):
            spent.clear()
            total = once(knobs)
            runs.append({"total": total, **spent, "prefill and the rest": total - sum(spent.values())})
        tables.append({name: statistics.median(run.get(name, 0.0) for run in runs) for name in runs[0]})
    names = list(dict.fromkeys(name for table in tables for name in table))
    labels = [",".join(f"{k}={v}" for k, v in knobs.items()) or "defaults" for knobs in settings]
    for i, label in enumerate(labels, 1):
        print(f"s{i}: {label}")
    print(f"{'phase (ms)':<24} " + " ".join(f"{f's{i}':>10}" for i in range(1, len(labels) + 1)))
    for name in names:
        print(f"{name:<24} " + " ".join(f"{1000 * table.get(name, 0.0):>10.1f}" for table in tables))
    if plain is not None:
        print(f"{'plain prefill':<24} {1000 * plain:>10.1f}")
        print(f"{'x plain':<24} " + " ".join(f"{table['total'] / plain:>10.2f}" for table in tables))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "device": torch.cuda.get_device_name(), "model": args.model, "tokens": args.tokens,
                       "method": args.method, "importance": args.importance, "repeat_depth": args.repeat_depth,
                       "batch_tokens": args.batch_tokens, "torch": torch.__version__,
                       "plain_prefill_ms": None if plain is None else round(1000 * plain, 2),
                       "settings": [{"set": knobs, "ms": {k: round(1000 * v, 2) for k, v in table.items()},
                                     "x_plain": None if plain is None else round(table["total"] / plain, 3)}
                                    for knobs, table in zip(settings, tables)]}, f, indent=1)
    if args.syncs:
        print_syncs(lambda: once(settings[-1]))
    knobs = settings[-1]
    if args.rows == 0:
        return
    if args.phase:
        only["on"] = True
        once(knobs)
        prof = only["profiles"][0]
    else:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            once(knobs)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


def plain_prefill(model, ids) -> float:
    """Seconds of the plain prefill of ``ids`` (SDPA attention into a ``DynamicCache``), as
    ``chelsea bench`` times the full cache's prefill."""
    use_method(model, "full")
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, **cache_arg(model, DynamicCache()), use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def print_syncs(call) -> None:
    """Run ``call`` once with synchronising CUDA operations reported, and print their places
    (``file:line``, the Python frame that called the operation) by how often they waited."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    places = Counter(f"{w.filename.rsplit('/', 2)[-1] if '/' in w.filename else w.filename}:{w.lineno}" for w in caught
                     if "synchroniz" in str(w.message))
    print(f"\nsynchronising operations in one call: {sum(places.values())}")
    for place, count in places.most_common(20):
        print(f"{count:>6}  {place}")


if __name__ == "__main__":
    main()
