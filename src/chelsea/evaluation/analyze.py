"""``chelsea analyze``: do a real model's keys support clustering, and the alternating split?

Two measurements on the keys a model stores in its cache (after RoPE, as clustering sees them):

1. Mean cosine similarity of two keys of the same layer and KV head as a function of their
   distance in tokens, per layer, on prose (the haystack essays) and on code (Python's own
   standard-library sources, public modules in name order: abc, aifc, argparse, ...). Chelsea's premise is that nearby keys are similar.
2. The partition check: within chunks of ``chunk_size`` consecutive keys, split into sets A and B
   three ways (alternating positions, as Chelsea does; first half / second half; a random half),
   and average over A of the best cosine similarity to any key of B. Higher means better merge
   partners for every candidate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import DynamicCache

from ..compat import cache_arg
from ..errors import ChelseaError
from ..haystack import find_haystack, haystack_text
from ..models import check_prompt_length
from ..runtime import use_method

SPLITS = ("alternating", "halves", "random")


def code_text(min_chars: int) -> str:
    """Python standard-library sources (public modules, in file-name order) until ``min_chars`` characters."""
    folder = Path(os.__file__).parent
    parts, total = [], 0
    for path in sorted(p for p in folder.glob("*.py") if not p.name.startswith("_")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    return "\n\n".join(parts)


def layer_keys(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Keys stored by each layer for one prompt, ``[kv_heads, tokens, head_dim]`` float32 each."""
    use_method(model, "full")
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=input_ids.to(model.device), **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
    return [layer.keys[0].float() for layer in cache.layers]


def similarity_by_distance(keys: torch.Tensor, distances: list[int]) -> list[float]:
    """Mean cosine similarity of ``keys[:, i]`` and ``keys[:, i + d]`` over positions and heads, per ``d``."""
    unit = torch.nn.functional.normalize(keys, dim=-1)
    out = []
    for d in distances:
        if d >= unit.shape[1]:
            out.append(float("nan"))
            continue
        out.append(float((unit[:, :-d] * unit[:, d:]).sum(-1).mean()))
    return out


def split_masks(chunk_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Boolean masks of set A within a chunk for each split (B is the rest)."""
    alternating = torch.arange(chunk_size) % 2 == 0
    halves = torch.arange(chunk_size) < chunk_size // 2
    random = torch.zeros(chunk_size, dtype=torch.bool)
    random[torch.randperm(chunk_size, generator=generator)[: chunk_size // 2]] = True
    return {"alternating": alternating, "halves": halves, "random": random}


def best_match_similarity(keys: torch.Tensor, chunk_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Mean over chunks, heads and A-members of the best cosine similarity to a member of B, per split.

    The random split is drawn afresh for every chunk.
    """
    heads, n, dim = keys.shape
    chunks = n // chunk_size
    if chunks == 0:
        raise ChelseaError(f"need at least {chunk_size} tokens for the partition check; got {n}")
    unit = torch.nn.functional.normalize(keys[:, : chunks * chunk_size], dim=-1).reshape(heads, chunks, chunk_size, dim)
    sims = unit @ unit.transpose(-1, -2)  # [H, chunks, C, C]
    g = torch.Generator().manual_seed(seed)
    totals = dict.fromkeys(SPLITS, 0.0)
    for c in range(chunks):
        for name, a in split_masks(chunk_size, g).items():
            best = sims[:, c][:, a][:, :, ~a].amax(-1)  # [H, |A|]
            totals[name] += float(best.mean())
    return {name: total / chunks for name, total in totals.items()}


def analyze(model, tokenizer, *, tokens: int = 4096, chunk_size: int = 32, haystack: Path | None = None,
            distances: list[int] | None = None, seed: int = 0) -> dict:
    """Both measurements on prose and on code; returns a JSON-ready dict."""
    check_prompt_length(model.config, tokens)
    folder = find_haystack(haystack)
    if folder is None:
        raise ChelseaError("analyze needs the haystack text for prose: pass --haystack DIR or set CHELSEA_HAYSTACK")
    texts = {"prose": haystack_text(folder), "code": code_text(40 * tokens)}
    distances = distances or [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if d < tokens]
    result = {"tokens": tokens, "chunk_size": chunk_size, "distances": distances, "texts": {}}
    for name, text in texts.items():
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :tokens]
        if ids.shape[1] < tokens:
            raise ChelseaError(f"the {name} text has only {ids.shape[1]} tokens; use a smaller --tokens")
        per_layer = []
        for i, keys in enumerate(layer_keys(model, ids)):
            per_layer.append({
                "layer": i,
                "similarity": similarity_by_distance(keys, distances),
                "best_match": best_match_similarity(keys, chunk_size, seed),
            })
        result["texts"][name] = per_layer
    return result


def markdown(result: dict, model_name: str) -> str:
    """Tables: similarity vs distance (mean over layers, and first/middle/last layer), splits per text."""
    d = result["distances"]
    lines = [f"# Key similarity on {model_name}", "",
             f"{result['tokens']} tokens per text; keys after RoPE as stored in the cache; cosine similarity "
             "averaged over positions and KV heads.", "",
             "## Mean cosine similarity of two keys vs their distance in tokens", "",
             "| text | layers | " + " | ".join(str(x) for x in d) + " |", "|---|---|" + "---|" * len(d)]
    for name, layers in result["texts"].items():
        n = len(layers)
        picks = [("mean", list(range(n))), ("first", [0]), ("middle", [n // 2]), ("last", [n - 1])]
        for label, idx in picks:
            values = [sum(layers[i]["similarity"][j] for i in idx) / len(idx) for j in range(len(d))]
            lines.append(f"| {name} | {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", f"## Best-match similarity within chunks of {result['chunk_size']} (set A to set B)", "",
              "| text | " + " | ".join(SPLITS) + " | layers where alternating is best |", "|---|" + "---|" * (len(SPLITS) + 1)]
    for name, layers in result["texts"].items():
        means = {s: sum(layer["best_match"][s] for layer in layers) / len(layers) for s in SPLITS}
        wins = sum(max(SPLITS, key=lambda s: layer["best_match"][s]) == "alternating" for layer in layers)
        lines.append(f"| {name} | " + " | ".join(f"{means[s]:.3f}" for s in SPLITS) + f" | {wins} of {len(layers)} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, model_name: str, path: Path) -> None:
    from .report import _plt

    plt = _plt()
    texts = list(result["texts"])
    fig, axes = plt.subplots(1, len(texts) + 1, figsize=(4.6 * (len(texts) + 1), 3.6))
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes, texts):
        layers = result["texts"][name]
        for layer in layers:
            ax.plot(result["distances"], layer["similarity"], color=cmap(layer["layer"] / max(1, len(layers) - 1)), lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distance (tokens)")
        ax.set_ylabel("mean cosine similarity")
        ax.set_title(f"{name}: one line per layer (dark = first)", fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    width = 0.8 / len(texts) / len(SPLITS)
    for t, name in enumerate(texts):
        layers = result["texts"][name]
        for s, split in enumerate(SPLITS):
            x = [layer["layer"] + (t * len(SPLITS) + s) * width for layer in layers]
            ax.bar(x, [layer["best_match"][split] for layer in layers], width, label=f"{name}, {split}")
    lowest = min(layer["best_match"][split] for name in texts for layer in result["texts"][name] for split in SPLITS)
    ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("best-match similarity A to B")
    ax.set_title(f"partitions of chunks of {result['chunk_size']}", fontsize=9)
    ax.legend(fontsize=6)
    fig.suptitle(model_name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, model_name: str, out_dir: Path, *, plots: bool = True) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = model_name.replace("/", "_")
    paths = [out_dir / f"analyze_{stem}.json", out_dir / f"analyze_{stem}.md"]
    paths[0].write_text(json.dumps({"model": model_name, **result}, indent=1))
    paths[1].write_text(markdown(result, model_name))
    if plots:
        paths.append(out_dir / f"analyze_{stem}.png")
        plot(result, model_name, paths[-1])
    return paths
