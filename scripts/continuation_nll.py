"""How well a compressed context still predicts what follows it: the question-free side of fidelity.

Each sample is ``--context`` tokens of haystack text compressed once (as ``agnostic`` compresses
a document, :func:`chelsea.importance.compress_context`), then the next ``--continuation`` tokens
are read through the compressed cache in one forward and their mean negative log-likelihood is
recorded. The ``ppl`` task of ``chelsea eval`` compresses inside the forward, block by block,
where ``guided`` and ``kvzip`` rank by the last queries only; this one goes through the
reconstruction scores and, for ``guided``, the fact heads.

    python scripts/continuation_nll.py [--samples 2] [--context 2048] [--continuation 256] [--ratio 0.8] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform

import torch
import transformers

from chelsea.compat import cache_arg
from chelsea.config import CompressionConfig
from chelsea.generation import make_cache, use_method
from chelsea.importance import compress_context
from chelsea.models import load_model
from chelsea.tasks import TaskBuilder

VARIANTS = [  # (label, method, CompressionConfig settings)
    ("full", "full", {}),
    ("kvzip", "kvzip", {}),
    ("guided, no fact heads", "guided", {"fact_weight": 0.0}),
    ("guided (defaults: fact heads)", "guided", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--out")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    builder = TaskBuilder(tokenizer)
    rows = []
    for index in range(args.samples):
        ids = torch.tensor([builder.ppl_sample(args.context + args.continuation, index).input_ids], device=model.device)
        for label, method, knobs in VARIANTS:
            use_method(model, method)
            cache = make_cache(method, CompressionConfig(ratio=args.ratio, **knobs))
            with torch.inference_mode():
                first = compress_context(model, cache, ids[:, : args.context], tokenizer)
                rest = model(ids[:, args.context : -1], **cache_arg(model, cache), use_cache=True).logits
            logits = torch.cat([first, rest], dim=1).float()
            nll = torch.nn.functional.cross_entropy(logits[0], ids[0, args.context :]).item()
            rows.append({"index": index, "variant": label, "nll": nll})
            print(f"sample {index} {label:30} nll {nll:.4f} ppl {math.exp(nll):.2f}", flush=True)
    print("\n| variant | mean NLL | perplexity |\n|---|---|---|")
    for label, _, _ in VARIANTS:
        mean = sum(r["nll"] for r in rows if r["variant"] == label) / args.samples
        print(f"| {label} | {mean:.4f} | {math.exp(mean):.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
                       "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "device": str(model.device), "dtype": str(model.dtype),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
