"""Spike: can the prefill's own attention find the fact heads' facts, without a repeat?

The repeat of context reconstruction is what makes Chelsea's prefill cost 3x. This compares, on
the fact-head calibration prompts (codes planted in essays, :mod:`chelsea.fact_heads`), each
(layer, KV head)'s hit rate (share of the codes' tokens inside its top 10%) for two scores:

- ``reconstruction``: the largest attention an entry receives from the repeat (what Chelsea uses);
- ``prefill``: the largest attention an entry receives from any later query of the prefill itself
  (free: the prefill computes these probabilities anyway).

Heads are chosen on the calibration prompts (seed 0), also among the first N layers only (a
repeat that stops there); ``consensus`` is the share of the codes'
tokens that the chosen heads' mean percentile puts in the top 10%, on other prompts (seed 1):
what the fact-head ranking would keep first in every layer.

    python scripts/prefill_fact_heads.py --model qwen2.5-coder-0.5b --out results.json
"""

from __future__ import annotations

import argparse
import json

import torch

import chelsea.cache as cache_module
from chelsea.compat import cache_arg
from chelsea.config import CompressionConfig
from chelsea.fact_heads import CODES_PER_PROMPT, TOP_SHARE, calibration_prompts, choose_heads, consensus, head_hits
from chelsea.generation import use_method
from chelsea.importance import score_by_reconstruction
from chelsea.methods import COMPRESSORS
from chelsea.models import load_model


def scores_of(model, tokenizer, ids, *, reconstruction: bool) -> list[torch.Tensor]:
    config = CompressionConfig(ratio=0.8)
    cache = cache_module.ClusteredCache(config, compressor=COMPRESSORS["kvzip"])
    with cache.held(question=not reconstruction), torch.no_grad():
        model(ids, **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
        if reconstruction:
            score_by_reconstruction(model, cache, ids, tokenizer)
    return [layer.scores.clone() for layer in cache.layers if layer.is_initialized]


parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", default="qwen2.5-coder-0.5b")
parser.add_argument("--length", type=int, default=1024)
parser.add_argument("--heads", type=int, default=12)
parser.add_argument("--out")
args = parser.parse_args()
model, tokenizer = load_model(args.model, device="cpu")
use_method(model, "kvzip")
codes = CODES_PER_PROMPT * args.length // 1024
ids, positions = calibration_prompts(tokenizer, length=args.length, codes=codes)
test_ids, test_positions = calibration_prompts(tokenizer, length=args.length, codes=codes, seed=1)
cfg = CompressionConfig()


def consensus_hits(scores, heads, positions) -> float:
    agreed = consensus(scores, heads, cfg.sink_tokens, cfg.window)  # [prompts, region]
    k = max(1, int(TOP_SHARE * agreed.shape[-1]))
    top = agreed.topk(k, dim=-1).indices
    found = []
    for row, pos in enumerate(positions):
        kept = set(top[row].tolist())
        found.append(sum(p - cfg.sink_tokens in kept for p in pos) / len(pos))
    return sum(found) / len(found)


rows = {}
runs = {"reconstruction": (scores_of(model, tokenizer, ids, reconstruction=True),
                           scores_of(model, tokenizer, test_ids, reconstruction=True))}
cache_module.OBSERVATION_WINDOW = None  # every prefill query counts, not only the last 32
runs["prefill"] = (scores_of(model, tokenizer, ids, reconstruction=False), scores_of(model, tokenizer, test_ids, reconstruction=False))
hits = {name: head_hits(scores, positions, cfg.sink_tokens, cfg.window) for name, (scores, _) in runs.items()}
for name, (_, test_scores) in runs.items():
    chosen = choose_heads(hits[name], args.heads)
    rows[name] = {"heads": chosen.heads, "hit_rate": [round(r, 3) for r in chosen.hit_rate],
                  "mean_top": round(sum(chosen.hit_rate) / len(chosen.hit_rate), 3),
                  "deepest_layer": max(layer for layer, _ in chosen.heads),
                  "consensus_held_out": round(consensus_hits(test_scores, chosen, test_positions), 3)}
    print(f"{name:15} mean hit rate of the top {args.heads}: {rows[name]['mean_top']:.3f}; their consensus on other "
          f"prompts: {rows[name]['consensus_held_out']:.3f}; deepest layer {rows[name]['deepest_layer']}; best "
          + ", ".join(f"L{l}h{h} {r:.2f}" for (l, h), r in list(zip(chosen.heads, chosen.hit_rate))[:6]))
# A shorter repeat: the heads chosen only among the first `depth` layers (the repeat would stop there).
test_scores = runs["reconstruction"][1]
rows["reconstruction_by_depth"] = {}
for depth in (4, 6, 8, 10, 12, 17, hits["reconstruction"].shape[0]):
    chosen = choose_heads(hits["reconstruction"][:depth], args.heads)
    rows["reconstruction_by_depth"][depth] = round(consensus_hits(test_scores[:depth], chosen, test_positions), 3)
print("reconstruction heads from the first N layers only, consensus on other prompts: "
      + ", ".join(f"N={d} {v:.3f}" for d, v in rows["reconstruction_by_depth"].items()))
shared = set(rows["reconstruction"]["heads"]) & set(rows["prefill"]["heads"])
print(f"heads in both top-{args.heads} sets: {len(shared)}")
if args.out:
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "length": args.length, "prompts": ids.shape[0], "device": "cpu", **rows,
                   "shared_heads": sorted(shared)}, f, indent=1)
