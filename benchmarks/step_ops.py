"""PyTorch operations in one decoding forward of a batch of joined rows, by the code that ran them.

A server's decoding step is bound by the host (``serve_phases.py --host-time``): what it costs is
mostly how many operations the host issues. This counts them for one step of a model of the
preset's architecture (random weights, its layers narrowed so it runs on a CPU: the count does not
depend on the sizes) with a clustered cache of ``--rows`` joined rows, split by caller (the
``chelsea`` function, or transformers' model file). On the CPU the attention runs PyTorch's path,
where a GPU launches the Triton kernel (two launches per layer); the compressions after the step
are left out, since the GPU runs them through other kernels (``serve_phases.py --profile`` counts
them there). Prints a table and writes JSON.

    python benchmarks/step_ops.py --preset qwen2.5-7b --method chelsea-paper --out step_ops.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

import chelsea
from chelsea import ClusteredCache, CompressionConfig
from chelsea.compat import cache_arg
from chelsea.models import PRESETS
from serve_phases import caller


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[caller(("chelsea", "transformers"))] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen2.5-7b", choices=sorted(PRESETS))
    parser.add_argument("--method", default="chelsea-paper", help="a method that needs no scorer of a real model")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    family, settings = PRESETS[args.preset]
    heads, kv = settings["num_attention_heads"], settings["num_key_value_heads"]
    head_dim = settings["hidden_size"] // heads
    narrow = dict(settings, hidden_size=heads * 8, intermediate_size=64, vocab_size=512, head_dim=8)  # same layers and heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **narrow)).eval()
    chelsea.prepare_model(model)
    config = CompressionConfig(ratio=0.8)
    with torch.inference_mode():
        batch = ClusteredCache(config, method=args.method)
        for i in range(args.rows):
            part = ClusteredCache(config, method=args.method)
            model(torch.randint(0, 512, (1, 300 + 20 * i)), **cache_arg(model, part), use_cache=True)
            batch.append_rows(part)
        tokens = torch.randint(0, 512, (args.rows, 1))
        for _ in range(3):  # settle the buffers' growth first
            positions = torch.tensor(batch.row_positions())[:, None]
            with batch.held():
                model(tokens, position_ids=positions, **cache_arg(model, batch), use_cache=True, logits_to_keep=1)
            batch.compress_due()
        positions = torch.tensor(batch.row_positions())[:, None]
        forward = _Counter()
        with forward, batch.held():
            model(tokens, position_ids=positions, **cache_arg(model, batch), use_cache=True, logits_to_keep=1)
        counts = {"forward": forward.ops}
    print(f"{args.preset} ({family}, {settings['num_hidden_layers']} layers, {heads}/{kv} heads, head size {head_dim} "
          f"narrowed to 8), {args.method}, {args.rows} joined rows: PyTorch operations in one decoding forward")
    table = {}
    for phase, ops in counts.items():
        print(f"{phase}: {sum(ops.values())}")
        for caller, n in ops.most_common(12):
            print(f"  {n:6d}  {caller}")
        table[phase] = {"operations": sum(ops.values()), "by_caller": dict(ops.most_common())}
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "device": "cpu", "torch": torch.__version__,
                "command": "python benchmarks/step_ops.py " + " ".join(sys.argv[1:])}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": table}, f, indent=1)


if __name__ == "__main__":
    main()
