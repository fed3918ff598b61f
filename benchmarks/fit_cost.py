"""What ``fit=True`` adds to a prefill: the compression of every layer with and without the fit,
beside a plain prefill of the same preset and context, in one run.

A preset (random weights: right for time, never for accuracy) gives the shapes; every layer's
keys, values, scores and reference queries (the last ``fit_queries`` queries per query head) are
random, and :func:`chelsea.methods.merge_by_importance` compresses all layers at once at
``--ratio``, as after a prefill, with ``fit`` off and on. ``fit_s`` is the difference; ``x plain``
is that over the plain prefill (one forward of the preset over ``--context`` random tokens).
Medians of ``--repeats`` timed runs after one warm-up; CUDA is synchronised around each.

Usage: python benchmarks/fit_cost.py --model qwen2.5-7b --contexts 32768 --device cuda --out fit_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from chelsea.methods import ReferenceQueries, get_method, merge_by_importance
from chelsea.models import load_preset_or_model


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after a warm-up."""
    fn()
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a preset (random weights)")
    parser.add_argument("--contexts", default="4096")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model = load_preset_or_model(args.model, device=args.device)
    device, dtype, config = model.device, model.dtype, model.config
    layers, kv_heads, q_heads = config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    method = get_method("chelsea", fit=True)
    rows = []
    for n in (int(x) for x in args.contexts.split(",")):
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (1, n), device=device, generator=g)
        with torch.no_grad():
            plain = timed(lambda: model(ids, use_cache=False, logits_to_keep=1), device, args.repeats)
        keys = torch.randn(layers, kv_heads, n, dim, device=device, dtype=dtype, generator=g)
        values = torch.randn_like(keys)
        scores = torch.rand(layers, kv_heads, n, device=device, generator=g)
        counts = torch.zeros(layers, kv_heads, n, device=device)
        queries = torch.randn(layers, q_heads, method.fit_queries, dim, device=device, dtype=dtype, generator=g)
        refs = ReferenceQueries(queries, torch.full(queries.shape[:3], float(n) ** 0.5, device=device), dim**-0.5)

        def compress(fit: bool):
            return lambda: merge_by_importance(keys, values, counts, int(args.ratio * n), scores=scores, sink_tokens=4,
                                               window=64, fit=fit, references=refs)

        without, with_fit = timed(compress(False), device, args.repeats), timed(compress(True), device, args.repeats)
        row = {"model": args.model, "context": n, "ratio": args.ratio, "device": str(device), "dtype": str(dtype),
               "plain_prefill_s": round(plain, 4), "compress_s": round(without, 4), "compress_fit_s": round(with_fit, 4),
               "fit_s": round(with_fit - without, 4), "fit_x_plain": round((with_fit - without) / plain, 4),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
        if device.type == "cuda":
            row["gpu"] = torch.cuda.get_device_name(device)
        rows.append(row)
        print(f"{args.model} {n} tokens: plain prefill {plain:.3f} s; compression of {layers} layers {without:.3f} s, "
              f"with the fit {with_fit:.3f} s: the fit adds {with_fit - without:.3f} s = {(with_fit - without) / plain:.3f}x plain",
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
