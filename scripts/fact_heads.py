"""Which KV heads' reconstruction scores single out the planted facts? (analysis for issue 14)

Scores a few 2K `agnostic` prompts with `kvzip`'s context reconstruction (the paper's scores:
``output_norm`` off), keeps every layer's scores, and measures, for the digits and capitals of the
planted facts (`scripts/oracle_facts.py` finds them), the share that lands in the top 10% of each
(layer, KV head), of each token's surprisal, and of two token-level aggregates: the mean over
layers of a token's percentile (its largest over the heads), and the mean percentile over a few
heads chosen on the prompts of index 0 and tried on those of index 1 (held out).

    python scripts/fact_heads.py [--samples 2] [--tasks multivalue,vartrack,multikey] [--save F | --load F]

A diagnostic that knows the answers, not a method. Runs on the CPU (about 2-4 minutes a prompt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import chelsea.cache
from chelsea.config import CompressionConfig
from chelsea.generation import make_cache, use_method
from chelsea.importance import compress_context, token_surprisal
from chelsea.models import load_model
from chelsea.tasks import TaskBuilder

sys.path.insert(0, str(Path(__file__).parent))
import oracle_facts  # noqa: E402


def collect(tasks: list[str], samples: int) -> list[dict]:
    """Per prompt: the context's ids, fact and value positions, every layer's scores, surprisal."""
    TaskBuilder.sample = oracle_facts._sample(TaskBuilder.sample)
    saved: list = []
    original = chelsea.cache.compress_together

    def keep_scores(layers):
        if not saved:
            saved.extend(layer.scores[0].clone() for layer in layers)
        return original(layers)

    chelsea.cache.compress_together = keep_scores
    model, tokenizer = load_model("qwen2.5-coder-0.5b")
    builder = TaskBuilder(tokenizer)
    out = []
    for task in tasks:
        for index in range(samples):
            s = builder.sample(task, 2048, "agnostic", index)
            ids = torch.tensor([s.input_ids[: s.context_end]], device=model.device)
            saved.clear()
            use_method(model, "kvzip")
            cache = make_cache("kvzip", CompressionConfig(ratio=0.8, output_norm=False))
            with torch.inference_mode():
                compress_context(model, cache, ids, tokenizer)
                hidden = model.get_decoder()(input_ids=ids).last_hidden_state
                surprisal = token_surprisal(model, hidden, ids)[0].cpu()
            out.append({"task": task, "index": index, "facts": s.meta["fact_positions"], "values": s.meta["value_positions"],
                        "scores": torch.stack(saved).float().cpu(), "surprisal": surprisal})
            print(f"scored {task} {index}", flush=True)
    return out


def in_top(token_scores: torch.Tensor, positions: list[int], share: float, lo: int, hi: int) -> float:
    """Share of ``positions`` whose score is within the top ``share`` of region ``[lo, hi)``."""
    region = token_scores[lo:hi]
    threshold = region.topk(max(1, int(share * (hi - lo)))).values[-1]
    inside = [p for p in positions if lo <= p < hi]
    return float((token_scores[inside] >= threshold).float().mean())


def percentiles(scores: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Each entry's rank within its (layer, head) region as a fraction, ``[layers, heads, n]`` (0 outside)."""
    out = torch.zeros_like(scores)
    out[..., lo:hi] = scores[..., lo:hi].argsort(-1).argsort(-1).float() / (hi - lo)
    return out


def report(prompts: list[dict], heads: int = 6) -> None:
    per_head = {}
    for d in prompts:
        scores = d["scores"]
        layers, kv, n = scores.shape
        lo, hi = 4, n - 64  # sinks and window, as the defaults keep them
        table = torch.tensor([[in_top(scores[l, h], d["values"], 0.1, lo, hi) for h in range(kv)] for l in range(layers)])
        per_head[(d["task"], d["index"])] = table
        pct = percentiles(scores, lo, hi)
        best = table.flatten().topk(3)
        print(f"{d['task']} {d['index']}: digits and capitals in the top 10% of the best heads "
              + ", ".join(f"L{int(i) // kv}h{int(i) % kv} {float(v):.2f}" for v, i in zip(best.values, best.indices))
              + f"; surprisal {in_top(d['surprisal'], d['values'], 0.1, lo, hi):.2f}"
              + f"; mean percentile over layers {in_top(pct.amax(1).mean(0), d['values'], 0.1, lo, hi):.2f}")
    chosen_on = [t for (task, index), t in per_head.items() if index == 0]
    if not chosen_on:
        return
    chosen = torch.stack(chosen_on).mean(0).flatten().topk(heads).indices
    kv = prompts[0]["scores"].shape[1]
    print(f"heads chosen on index 0: {', '.join(f'L{int(i) // kv}h{int(i) % kv}' for i in chosen)}")
    for d in prompts:
        if d["index"] == 0:
            continue
        n = d["scores"].shape[-1]
        pct = percentiles(d["scores"], 4, n - 64).flatten(0, 1)[chosen].mean(0)
        print(f"  held out {d['task']} {d['index']}: values in the top 10% {in_top(pct, d['values'], 0.1, 4, n - 64):.2f},"
              f" top 5% {in_top(pct, d['values'], 0.05, 4, n - 64):.2f}; whole fact sentences in the top 10%"
              f" {in_top(pct, d['facts'], 0.1, 4, n - 64):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="multivalue,vartrack,multikey")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--save", help="write the scored prompts here (torch.save)")
    parser.add_argument("--load", help="analyse prompts saved with --save instead of scoring")
    args = parser.parse_args()
    prompts = torch.load(args.load) if args.load else collect(args.tasks.split(","), args.samples)
    if args.save:
        torch.save(prompts, args.save)
    report(prompts, args.heads)


if __name__ == "__main__":
    main()
