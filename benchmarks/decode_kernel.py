"""Decode attention alone, one layer: full cache with PyTorch SDPA vs the clustered cache.

Shapes of one attention layer of a preset (``llama3-8b``: 32 query heads, 8 KV heads, head dim
128), bf16, one new token per sequence. For each context and batch size:

- ``sdpa_full``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` over all ``n`` entries;
- ``torch_clustered``: chelsea's PyTorch path (``weighted_attention``) over ``(1 - ratio) n``
  entries with log-counts;
- ``kernel_clustered``: the Triton kernel over the same clustered entries.

Times are CUDA-event medians over repeated calls after warm-up. ``kernel_bw_frac`` is the kernel's
bytes read (keys, values, log-counts) per second over the copy bandwidth measured here
(``copy_GBps``: bytes read + written by a device-to-device copy). Writes a JSON file and prints a
table. This is the attention kernel only: whole-model decode speed is ``chelsea bench``'s job.

Usage: python benchmarks/decode_kernel.py --out results/decode_kernel.json
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from chelsea.attention import decode_attention, weighted_attention
from cuda_timing import median_seconds as timed

PRESETS = {"llama3-8b": (32, 8, 128), "mistral-7b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}


def copy_bandwidth() -> float:
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=Path("results/decode_kernel.json"))
    args = parser.parse_args()
    hq, h, dim = PRESETS[args.preset]
    bw = copy_bandwidth()
    rows = []
    for n in (int(x) for x in args.contexts.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            kept = int((1 - args.ratio) * n)
            q = torch.randn(batch, hq, 1, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, h, n, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            kc, vc = k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous()
            lc = torch.log(torch.randint(1, 9, (batch, h, kept), device="cuda").float())
            t_full = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            t_torch = timed(lambda: weighted_attention(q, kc, vc, lc))
            t_kernel = timed(lambda: decode_attention(q, kc, vc, lc))
            kernel_bytes = kc.numel() * 2 * 2 + lc.numel() * 4
            rows.append({
                "device": torch.cuda.get_device_name(), "preset": args.preset, "context": n, "batch": batch,
                "ratio": args.ratio, "sdpa_full_ms": round(t_full * 1e3, 4), "torch_clustered_ms": round(t_torch * 1e3, 4),
                "kernel_clustered_ms": round(t_kernel * 1e3, 4), "speedup_kernel_vs_full": round(t_full / t_kernel, 2),
                "full_bw_frac": round(k.numel() * 2 * 2 / t_full / bw, 3), "kernel_bw_frac": round(kernel_bytes / t_kernel / bw, 3),
                "copy_GBps": round(bw / 1e9, 1),
            })
            print(rows[-1], flush=True)
            del k, v, kc, vc
            torch.cuda.empty_cache()
    cols = ["context", "batch", "sdpa_full_ms", "torch_clustered_ms", "kernel_clustered_ms", "speedup_kernel_vs_full", "full_bw_frac", "kernel_bw_frac"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "command": "python benchmarks/decode_kernel.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
