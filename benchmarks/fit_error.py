"""Attention-output error of fitted merges against count-weighted centroids, on queries the fit never saw.

One forward of a built-in model over an evaluation essay (never calibration text) records, per
layer, the keys, values and queries (after rotary embedding) of a context of ``--context`` tokens
and of the ``--continuation`` tokens that follow it. Then, for each ratio and merge rule, the
context alone is compressed as ``chelsea`` compresses a context (``compress_context``: the
default scoring, budgets and clustering; the fit, with ``fit=True``, reproduces the context's
last ``fit_queries`` queries). Measured per layer, the relative error ``||o' - o|| / ||o||`` of the
attention output, averaged over query heads and queries:

- ``next``: the queries of the ``--continuation`` tokens that follow the context in the essay (they
  attend to the compressed context and, causally, to themselves): queries no fit saw, reading on;
- ``reread``: the queries of a repeat of the context's first ``--continuation`` tokens after a
  "repeat the text" prompt: held-out queries that read the start of the context, far from the
  queries the fit saw;
- ``fitted``: the context's last ``fit_queries`` queries (what ``fit=True`` fits to).

Merge rules: ``centroid`` (count-weighted centroid, the default), ``fit`` (the centroid key, the
value and log-count fitted: ``fit=True``), ``values`` (the representative keeps its own key; the
values are averaged), ``values-fit`` (its own key, value and log-count fitted) and, as the floor
of merging, ``evict`` (``exact_share=1``: the same kept entries, the rest dropped).

Usage: python benchmarks/fit_error.py --model qwen2.5-coder-0.5b --context 2048 --out results/fit_error
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from chelsea import ClusteredCache, CompressionConfig, compress_context, get_method, prepare_model
from chelsea.haystack import evaluation_files, find_haystack, haystack_text
from chelsea.models import load_model

REREAD_PROMPT = "\n\nRepeat the text above from its beginning:\n"
RULES = {"centroid": {}, "fit": {"fit": True}, "values": {"merge": "values"}, "values-fit": {"merge": "values", "fit": True},
         "evict": {"exact_share": 1.0}}


def capture(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{layer: (queries [Hq, n, d], keys [H, n, d], values [H, n, d])}`` of one uncompressed forward."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store = {}

    def capturing(module, query, key, value, attention_mask, **kwargs):
        store[module.layer_idx] = (query[0].float().clone(), key[0].float().clone(), value[0].float().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("fit_error_capture", capturing)
    model.set_attn_implementation("fit_error_capture")
    with torch.inference_mode():
        model(ids, use_cache=False)
    return store


def output_error(q, keys, values, bias, full_keys, full_values, visible: torch.Tensor, full_visible: torch.Tensor) -> float:
    """Mean relative error of the attention output of ``q`` ``[Hq, m, d]`` over the compressed
    ``(keys, values, bias)`` against the full ``(full_keys, full_values)``; ``visible``
    ``[m, entries]`` says which entries each query may see."""
    heads, groups, scale = keys.shape[0], q.shape[0] // keys.shape[0], q.shape[-1] ** -0.5
    errors = []
    for h in range(q.shape[0]):
        kv = h // groups
        logits = (q[h] @ keys[kv].T) * scale + bias[kv]
        approx = logits.masked_fill(~visible, float("-inf")).softmax(-1) @ values[kv]
        exact = ((q[h] @ full_keys[kv].T) * scale).masked_fill(~full_visible, float("-inf")).softmax(-1) @ full_values[kv]
        errors.append(torch.linalg.vector_norm(approx - exact, dim=-1) / torch.linalg.vector_norm(exact, dim=-1))
    return torch.cat(errors).mean().item()


def held_out_error(captured, ck, cv, cc, context: int, skip: int = 0) -> float:
    """The error of the queries after the context, but for the first ``skip`` (``captured``: one
    layer's ``(q, k, v)`` of the context and what follows it), over ``[compressed context, what follows]``."""
    q, k, v = captured
    stored, after = ck.shape[1], k.shape[1] - context
    keys, values = torch.cat([ck, k[:, context:]], 1), torch.cat([cv, v[:, context:]], 1)
    bias = torch.cat([cc, cc.new_zeros(cc.shape[0], after)], 1)
    causal = torch.ones(after, after, dtype=torch.bool).tril()[skip:]
    visible = torch.cat([torch.ones(after - skip, stored, dtype=torch.bool), causal], 1)
    full_visible = torch.cat([torch.ones(after - skip, context, dtype=torch.bool), causal], 1)
    return output_error(q[:, context + skip :], keys, values, bias, k, v, visible, full_visible)


def layer_errors(captures: dict[str, dict], cache, context: int, fitted: int) -> list[dict]:
    """Per layer: each held-out set's and the fitted queries' errors over the compressed cache ``cache``."""
    rows = []
    for index, layer in enumerate(cache.layers):
        ck, cv, cc = layer.keys[0].float(), layer.values[0].float(), layer.log_counts[0].float()
        stored = ck.shape[1]
        held = {name: round(held_out_error(captured[index], ck, cv, cc, context, skip), 4)
                for name, (captured, skip) in captures.items()}
        q, k, v = captures["next"][0][index]
        # fitted: the context's last queries over the compressed context (its last entries are the window, in order)
        tail = torch.ones(fitted, fitted, dtype=torch.bool).tril()
        visible = torch.cat([torch.ones(fitted, stored - fitted, dtype=torch.bool), tail], 1)
        full_visible = torch.cat([torch.ones(fitted, context - fitted, dtype=torch.bool), tail], 1)
        fit = output_error(q[:, context - fitted : context], ck, cv, cc, k[:, :context], v[:, :context], visible, full_visible)
        rows.append({"layer": index, **held, "fitted": round(fit, 4), "entries": stored})
    return rows


def _cpu(captured: dict) -> dict:
    return {i: tuple(t.cpu() for t in x) for i, x in captured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=64, help="held-out queries per set (next, reread)")
    parser.add_argument("--ratios", default="0.8,0.9,0.95")
    parser.add_argument("--rules", default="centroid,fit,evict", help=f"comma-separated, of {', '.join(RULES)}")
    parser.add_argument("--offset", type=int, default=0, help="start this many tokens into the evaluation essays")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/fit_error"))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    text = haystack_text(find_haystack(), evaluation_files(find_haystack()))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, args.offset : args.offset + args.context + args.continuation]
    ids = ids.to(model.device)
    prompt = tokenizer(REREAD_PROMPT, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    reread = torch.cat([ids[:, : args.context], prompt, ids[:, : args.continuation]], 1)
    captures = {"next": (_cpu(capture(model, ids)), 0), "reread": (_cpu(capture(model, reread)), prompt.shape[1])}
    prepare_model(model)
    fitted = get_method("chelsea", fit=True).fit_queries
    rows = []
    for ratio in (float(x) for x in args.ratios.split(",")):
        for rule in args.rules.split(","):
            start = time.time()
            cache = ClusteredCache(CompressionConfig(ratio=ratio), method=get_method("chelsea", **RULES[rule]))
            with torch.inference_mode():
                compress_context(model, cache, ids[:, : args.context], tokenizer)
            per_layer = layer_errors(captures, cache, args.context, fitted)
            mean = {key: round(sum(r[key] for r in per_layer) / len(per_layer), 4) for key in (*captures, "fitted")}
            row = {"ratio": ratio, "rule": rule, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **mean, "kv_bytes": cache.nbytes(), "seconds": round(time.time() - start, 1),
                   "layers": per_layer}
            rows.append(row)
            print({k: v for k, v in row.items() if k != "layers"}, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "context": args.context, "continuation": args.continuation, "offset": args.offset,
            "fit_queries": fitted, "device": str(model.device), "machine": platform.processor() or platform.machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    stem = f"fit_error_{args.model}_{args.context}"
    path = args.out / f"{stem}.json"
    if path.exists():  # rows of other (ratio, rule) pairs measured before stay, with their dates
        ran = {(r["ratio"], r["rule"]) for r in rows}
        earlier = json.loads(path.read_text())
        rows = [r for r in earlier["rows"] if (r["ratio"], r["rule"]) not in ran] + rows
        rows.sort(key=lambda r: (r["ratio"], list(RULES).index(r["rule"])))
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    """Per ratio: one table, a column per (query set, rule), the mean first, then a row per layer."""
    lines = [f"# Attention-output error, {meta['model']}, {meta['context']} tokens, {meta['continuation']} held-out queries per set",
             "", f"{meta['date']}, {meta['device']}. Relative error ||o' - o|| / ||o||, mean over query heads and queries; "
             "`next`: the text after the context, `reread`: the context's start read again (both never fitted); "
             f"`fitted`: the context's last {meta['fit_queries']} queries, which `fit=True` fits to.", ""]
    sets = [k for k in rows[0] if k in ("next", "reread", "fitted")]
    for ratio in sorted({r["ratio"] for r in rows}):
        sel = [r for r in rows if r["ratio"] == ratio]
        columns = [(name, r) for name in sets for r in sel]
        lines += [f"## {ratio:.0%} removed", "", "| layer | " + " | ".join(f"{name}, {r['rule']}" for name, r in columns) + " |",
                  "|---" * (len(columns) + 1) + "|",
                  "| **mean** | " + " | ".join(f"**{r[name]:.4f}**" for name, r in columns) + " |"]
        for i in range(len(sel[0]["layers"])):
            lines.append(f"| {i} | " + " | ".join(f"{r['layers'][i][name]:.4f}" for name, r in columns) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
