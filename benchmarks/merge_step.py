"""Chelsea's prefill clustering alone, one layer: the PyTorch merge steps vs the Triton kernels.

One layer's keys and values of a preset (``llama3-8b``: 8 KV heads, head dim 128), bf16, random,
clustered at ``--ratio`` with the default settings (chunks of 32, 4 sinks, a window of 64, half of
set A per step), as right after a prefill. For each context and batch size it times
:func:`chelsea.methods.chunked_soft_matching` with the kernels (``triton``) and with them turned off
(``pytorch``), CUDA-event medians over repeated calls after warm-up; the host's launch time is
inside those times whenever the GPU waits for it. ``*_gpu_s`` is the GPU's time alone (each call
queued behind a spin, so the host is done issuing it before it starts): the cost inside a prefill
whose host runs ahead of the GPU. ``*_extra_mem_bytes``: peak memory allocated
during the calls beyond the inputs. ``per_prefill_s`` is that times the preset's
layers: the clustering's share of one prefill. Writes a JSON file and prints a table.

Usage: python benchmarks/merge_step.py --out results/merge_step.json
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from unittest import mock

import torch

from chelsea.methods import chunked_soft_matching
from chelsea import CompressionConfig
from chelsea.kernels import soft_matching
from cuda_timing import median_seconds

PRESETS = {"llama3-8b": (32, 8, 128), "mistral-7b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}  # layers, KV heads, dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("merge_step.py times GPU kernels: run it on a machine with a CUDA GPU")
    layers, heads, dim = PRESETS[args.preset]
    records = []
    print(f"{'context':>8} {'batch':>5} {'pytorch ms':>11} {'triton ms':>10} {'speed-up':>9} {'GPU-only ms pytorch / triton':>29} "
          f"{'per prefill s (triton)':>23} "
          f"{'extra GiB pytorch / triton':>27}")
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            keys = torch.randn(batch, heads, context, dim, device="cuda", dtype=torch.bfloat16)
            values = torch.randn_like(keys)
            log_counts = torch.zeros(batch, heads, context, device="cuda")
            n_remove = context - CompressionConfig(ratio=args.ratio).budget(context)
            run = partial(chunked_soft_matching, keys, values, log_counts, n_remove)
            base = torch.cuda.memory_allocated()
            peaks = {}
            for name, applies in (("pytorch", False), ("triton", True)):
                # new=, not return_value=: a MagicMock would keep every call's tensors alive
                with mock.patch.object(soft_matching, "kernel_applies", new=lambda *args, _applies=applies: _applies):
                    torch.cuda.reset_peak_memory_stats()
                    try:
                        peaks[name] = (median_seconds(run, args.reps, warmup=3), torch.cuda.max_memory_allocated() - base,
                                       median_seconds(run, max(3, args.reps // 2), warmup=1, gpu_only=True))
                    except torch.OutOfMemoryError:
                        peaks[name] = (float("nan"), float("nan"), float("nan"))
                        torch.cuda.empty_cache()
            (torch_s, torch_mem, torch_gpu), (kernel_s, kernel_mem, kernel_gpu) = peaks["pytorch"], peaks["triton"]
            record = {
                "device": torch.cuda.get_device_name(), "preset": args.preset, "context": context, "batch": batch,
                "ratio": args.ratio, "kept": context - n_remove, "pytorch_s": torch_s, "triton_s": kernel_s,
                "pytorch_gpu_s": torch_gpu, "triton_gpu_s": kernel_gpu,
                "speedup": torch_s / kernel_s, "pytorch_extra_mem_bytes": torch_mem, "triton_extra_mem_bytes": kernel_mem, "per_prefill_pytorch_s": torch_s * layers, "per_prefill_s": kernel_s * layers,
            }
            records.append(record)
            print(f"{context:>8} {batch:>5} {1e3 * torch_s:>11.2f} {1e3 * kernel_s:>10.2f} {record['speedup']:>8.2f}x "
                  f"{1e3 * torch_gpu:>17.2f} / {1e3 * kernel_gpu:<9.2f} "
                  f"{record['per_prefill_s']:>23.3f} {torch_mem / 2**30:>15.2f} / {kernel_mem / 2**30:.2f}", flush=True)
            del keys, values, log_counts, run
    if args.out:
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))


if __name__ == "__main__":
    main()
