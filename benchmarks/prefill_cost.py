"""Prefill cost of importance scoring + clustering against a plain prefill (one sequence).

For each setting: the prompt's forward into the cache, the scoring (context reconstruction,
surprisal or none) and the compression, timed with CUDA synchronisation, median of ``--repeats``
after one warm-up. ``full`` is the plain SDPA prefill into a DynamicCache. ``guided`` is
``chelsea`` (its earlier name, kept so the labels match the results already written); its
fact-head calibration runs once per model, before its setting's timed prefills, and is timed on
its own.

    python benchmarks/prefill_cost.py --model qwen2.5-coder-0.5b --tokens 32768 --out results.json

``--model`` also takes a preset of ``chelsea bench`` (``qwen2.5-0.5b``, ``llama3-8b``, ...): the
architecture with random weights, right for timing; ``--tokenizer`` then names a tokenizer folder
with a chat template, for the repeat prompt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
from transformers import DynamicCache

from chelsea.bench import load_with_tokenizer
from chelsea.compat import cache_arg
from chelsea.config import CompressionConfig
from chelsea.generation import make_cache, use_method
from chelsea.importance import compress_context, find_fact_heads

SETTINGS = [  # (label, method, importance, other CompressionConfig settings)
    ("full", "full", None, {}),
    ("chelsea-paper", "chelsea-paper", None, {}),
    ("kvzip window", "kvzip", "window", {}),
    ("guided surprise", "guided", "surprise", {}),
    ("kvzip local", "kvzip", "local", {"output_norm": False}),
    ("guided local", "guided", "local", {"output_norm": False, "fact_weight": 0.0}),
    ("kvzip local norm", "kvzip", "local", {"output_norm": True}),
    ("guided local norm", "guided", "local", {"output_norm": True, "fact_weight": 0.0}),
    ("guided local facts", "guided", "local", {"output_norm": True, "fact_weight": 100.0, "repeat_depth": "all"}),
    ("guided local facts shallow", "guided", "local", {"output_norm": True, "fact_weight": 100.0, "repeat_depth": "facts"}),  # the defaults
    ("kvzip full", "kvzip", "full", {"output_norm": False}),
    ("guided full", "guided", "full", {"output_norm": False, "fact_weight": 0.0}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default=",".join(s[0] for s in SETTINGS))
    parser.add_argument("--tokenizer", help="tokenizer folder (needed with a preset)")
    parser.add_argument("--out")
    args = parser.parse_args()
    model, tokenizer = load_with_tokenizer(args.model, args.tokenizer)
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
    wanted = args.settings.split(",")
    rows = []
    for label, method, importance, knobs in SETTINGS:
        if label not in wanted:
            continue
        use_method(model, method)
        times, calibration = [], None
        if method == "guided" and knobs.get("fact_weight", 0) > 0:  # once per model, outside the timed prefills
            torch.cuda.synchronize()
            start = time.perf_counter()
            find_fact_heads(model, tokenizer, make_cache(method, CompressionConfig(ratio=args.ratio, **knobs)))
            torch.cuda.synchronize()
            calibration = round(time.perf_counter() - start, 4)
        for _ in range(args.repeats + 1):
            config = CompressionConfig(ratio=args.ratio, importance=importance or "local", **knobs)
            cache = DynamicCache() if method == "full" else make_cache(method, config)
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                if method == "full":
                    model(ids, **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
                else:
                    compress_context(model, cache, ids, tokenizer)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del cache
        seconds = statistics.median(times[1:])
        rows.append({"setting": label, "method": method, "importance": importance, **knobs, "seconds": round(seconds, 4),
                     "calibration_seconds": calibration})
        print(f"{label:18} {seconds * 1000:9.1f} ms" + (f" (fact-head calibration, once: {calibration * 1000:.1f} ms)" if calibration else ""),
              flush=True)
    base = rows[0]["seconds"] if rows and rows[0]["setting"] == "full" else None
    for row in rows:
        row["vs_full"] = round(row["seconds"] / base, 2) if base else None
    print("\n| setting | prefill ms | x plain prefill |\n|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['seconds'] * 1000:.1f} | {row['vs_full']} |")
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "model": args.model, "tokens": args.tokens, "ratio": args.ratio,
              "command": "python benchmarks/prefill_cost.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                          if v is not None and k != "out"),
              "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
