"""Where the time of one ``compress_context`` goes: torch.profiler over kvzip with local context
reconstruction, one sequence, on the GPU.

    python benchmarks/profile_reconstruction.py --tokenizer .gpu/qwen-tokenizer > profile.txt

``--model`` is a preset of ``chelsea bench`` (random weights: right for timing only) or a model
name; a preset needs ``--tokenizer``, a folder with a chat template (for the repeat prompt). One
warm-up call, then one profiled call; prints the operators by their CUDA time.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from chelsea.bench import load_with_tokenizer
from chelsea.config import CompressionConfig
from chelsea.generation import make_cache, use_method
from chelsea.importance import compress_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--tokenizer", help="tokenizer folder (needed with a preset)")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--method", default="kvzip", choices=["kvzip", "guided"])
    parser.add_argument("--importance", default="local", choices=["local", "full"])
    parser.add_argument("--rows", type=int, default=25, help="operators to print")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this profile is of the GPU path: run it on a CUDA machine")
    model, tokenizer = load_with_tokenizer(args.model, args.tokenizer)
    use_method(model, args.method)
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(model.device)

    def once() -> None:
        cache = make_cache(args.method, CompressionConfig(ratio=0.8, importance=args.importance))
        with torch.inference_mode():
            compress_context(model, cache, ids, tokenizer)
        torch.cuda.synchronize()

    once()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        once()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
