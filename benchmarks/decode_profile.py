"""Where a decoding step's GPU time goes: kernels of CUDA-graph decoding, grouped by kind.

Prefills ``--batch`` random prompts of ``--context`` tokens into a cache (``--method full`` is the
uncompressed cache in the same buffers), then decodes ``--steps`` tokens with
:class:`chelsea.runtime.GraphDecoder` under ``torch.profiler`` and sums the CUDA time of every
kernel into groups: matrix products (weights), the decode attention kernel, and the rest (norms,
rotary, element-wise, and the clustering that runs every ``compress_every`` tokens between
replays). ``wall_ms_per_step`` is measured under the profiler. Prints a table and writes JSON;
CUDA only.

Usage: python benchmarks/decode_profile.py --model llama3-8b --context 32768 --batch 4 --out profile.json
       python benchmarks/decode_profile.py --model qwen2.5-7b --method chelsea --tokenizer TOKENIZER_DIR --batch 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import chelsea
from chelsea import CompressionConfig
from chelsea.compat import cache_arg
from chelsea.models import load_preset_or_model, load_with_tokenizer
from chelsea.runtime import GraphDecoder
from chelsea.scoring import prepare_scoring


def kind(name: str) -> str:
    n = name.lower()
    if "_split_kernel" in n or "_combine_kernel" in n:
        return "attention kernel"
    if "gemm" in n or "gemv" in n or "matmul" in n or "cutlass" in n or "sm90" in n or "nvjet" in n:
        return "matrix products"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--method", default="chelsea-paper", help="a method name, or full (the uncompressed cache)")
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--compress-every", type=int, default=None)
    p.add_argument("--tokenizer", help="tokenizer folder for a preset: a method scored by the learned scorer fits and uses it "
                                       "(without one its entries go unscored)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    if args.tokenizer:
        model, tokenizer = load_with_tokenizer(args.model, args.tokenizer)
        model = chelsea.prepare_model(model)
    else:
        model, tokenizer = chelsea.prepare_model(load_preset_or_model(args.model)), None
    ratio = 0.0 if args.method == "full" else args.ratio
    cache = chelsea.ClusteredCache(CompressionConfig(ratio=ratio, compress_every=args.compress_every),
                                   method="chelsea-paper" if args.method == "full" else args.method)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device=model.device)
    with torch.inference_mode():
        if tokenizer is not None:
            prepare_scoring(model, tokenizer, cache)
        token = model(ids, **cache_arg(model, cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
        decoder = GraphDecoder(model, cache, token, headroom=args.steps + 16)
        for _ in range(8):
            decoder.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                with record_function("step"):
                    decoder.step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / args.steps
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", 0.0)
        if event.device_type.name != "CUDA" or cuda_us == 0 or event.key == "step":  # "step": our own range, not a kernel
            continue
        groups[kind(event.key)] += cuda_us
    total = sum(groups.values())
    rows = {k: round(v / args.steps / 1e3, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    record = {
        "device": torch.cuda.get_device_name(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "method": args.method, "ratio": ratio, "context": args.context, "batch": args.batch,
        "steps": args.steps, "compress_every": cache.config.compress_every, "wall_ms_per_step": round(wall * 1e3, 3),
        "gpu_ms_per_step": round(total / args.steps / 1e3, 3), "gpu_ms_per_step_by_kind": rows,
        "top_kernels": [(e.key[:80], round(e.device_time_total / args.steps / 1e3, 4)) for e in sorted(
            (e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)[:25]],
    }
    print(f"{args.method} {ratio} context {args.context} batch {args.batch}: {record['wall_ms_per_step']} ms/step wall, "
          f"{record['gpu_ms_per_step']} ms/step of kernels")
    for k, v in rows.items():
        print(f"  {k:<18} {v:8.3f} ms/step")
    for name, ms in record["top_kernels"]:
        print(f"  {ms:8.4f}  {name}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
