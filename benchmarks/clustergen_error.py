"""ClusterGen on real keys, values and queries: error vs memory, clusters vs context length.

One forward pass of a built-in model over haystack text records, for a few layers, the post-RoPE
keys, the values and the queries (a capturing attention function registered with transformers).
By causality the first ``n`` positions of that pass are exactly what a prompt of ``n`` tokens
produces, so one pass serves every context length.

For each context length ``n`` and setting, the summary is built in bulk over positions
``[sinks, n - window)``, and the queries of the last ``queries`` positions attend to the summary
plus their exact sinks and window. Reported per (n, setting), averaged over layers, heads and
queries:

- ``clusters``: clusters opened per (layer, KV head), mean;
- ``mem_frac``: bytes of summary + exact tokens / bytes of the full cache of ``n`` tokens;
- ``rel_err``: ||estimate - exact|| / ||exact|| of the attention output;
- ``bound_ratio``: ||estimate - exact|| / (||softmax(q K)||_2 * ||V||_op), the error measured in the
  unit of SubGen's bound (error <= eps * ||softmax(q K)||_2 * ||V||_op); this is the eps observed;
- ``drop_err``: the relative error of attending to the sinks and window alone (the summarised
  tokens dropped, as StreamingLLM does): a summary is only worth its bytes below this.

``delta`` is relative to the keys' median norm or, with ``--radius spread``, to their median
distance from their mean. Both numerators are measured (``--numerators``): the paper's value-norm sample (``values``) and
the cluster members' own values (``clusters``). ``--per-layer`` also writes one row per layer.

Usage: python benchmarks/clustergen_error.py --model qwen2.5-coder-0.5b --max-tokens 16384 --out results/clustergen_error
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from chelsea.methods.clustergen import ClusterGenSummary, clustergen_attention, radius_scale
from chelsea.models import load_model
from chelsea.haystack import find_haystack, haystack_text


def capture(model, tokenizer, n_tokens: int, layers: list[int]):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store: dict[int, tuple] = {}

    def capturing(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            store[module.layer_idx] = (query[0].float().clone(), key[0].float().clone(), value[0].float().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("capture", capturing)
    model.set_attn_implementation("capture")
    text = haystack_text(find_haystack())
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    with torch.inference_mode():
        model(ids.to(model.device), use_cache=False)
    return store, ids.shape[1]


def spectral_norm(v: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(v.double(), ord=2).item()


def evaluate(q, k, v, n, *, sinks, window, queries, delta_rel, s, t, numerator="values", radius="norm", seed=0):
    """q [Hq, N, D], k/v [H, N, D]; context n. Returns a dict of metrics."""
    hq, heads, dim = q.shape[0], k.shape[0], k.shape[-1]
    groups = hq // heads
    old = slice(sinks, n - window)
    old_k, old_v = k[None, :, old], v[None, :, old]
    norm = radius_scale(old_k, radius)
    summ = ClusterGenSummary.empty(1, heads, dim, delta=delta_rel * norm, cluster_samples=s, value_samples=t,
                                   numerator=numerator, generator=torch.Generator().manual_seed(seed))
    summ.update(old_k, old_v)
    scale = dim**-0.5
    errs, ratios, drops = [], [], []
    for p in range(n - queries, n):
        exact_k = torch.cat([k[:, :sinks], k[:, sinks : n - window], k[:, n - window : p + 1]], 1)
        exact_v = torch.cat([v[:, :sinks], v[:, sinks : n - window], v[:, n - window : p + 1]], 1)
        win_k = torch.cat([k[:, :sinks], k[:, n - window : p + 1]], 1)[None]
        win_v = torch.cat([v[:, :sinks], v[:, n - window : p + 1]], 1)[None]
        query = q[:, p][None, :, None, :]
        est = clustergen_attention(query, summ, win_k, win_v, scale=scale)[0, :, 0]
        dropped = clustergen_attention(query, None, win_k, win_v, scale=scale)[0, :, 0]
        for h in range(hq):
            kv = h // groups
            probs = torch.softmax(scale * exact_k[kv] @ q[h, p], -1)
            exact = probs @ exact_v[kv]
            err = torch.linalg.vector_norm(est[h] - exact).item()
            errs.append(err / torch.linalg.vector_norm(exact).item())
            drops.append(torch.linalg.vector_norm(dropped[h] - exact).item() / torch.linalg.vector_norm(exact).item())
            ratios.append(err / (torch.linalg.vector_norm(probs).item() * spectral_norm(exact_v[kv])))
    per_token = 2 * dim * 4
    exact_tokens = sinks + window
    mem = summ.nbytes() / heads + exact_tokens * per_token
    return {
        "clusters": summ.n_clusters.float().mean().item(),
        "mem_frac": mem / (n * per_token),
        "rel_err": sum(errs) / len(errs),
        "bound_ratio": sum(ratios) / len(ratios),
        "drop_err": sum(drops) / len(drops),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replot", type=Path, help="Only redraw the plot from this results JSON.")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--layers", default="")
    parser.add_argument("--deltas", default="0.3,0.5,0.7")
    parser.add_argument("--value-samples", default="64,256")
    parser.add_argument("--cluster-samples", type=int, default=4)
    parser.add_argument("--numerators", default="values,clusters")
    parser.add_argument("--radius", default="norm", help="Comma-separated units of delta: norm, spread.")
    parser.add_argument("--per-layer", action="store_true", help="Also one row per layer (column layer).")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/clustergen_error"))
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text())["rows"], args.replot.with_suffix(".png"))
        return

    model, tokenizer = load_model(args.model, device="cpu")
    n_layers = model.config.num_hidden_layers
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [0, n_layers // 2, n_layers - 1]
    start = time.time()
    store, total = capture(model, tokenizer, args.max_tokens, layers)
    print(f"captured {total} tokens, layers {layers} in {time.time() - start:.0f} s", flush=True)
    lengths = [n for n in (int(x) for x in args.lengths.split(",")) if n <= total]
    rows = []
    for n in lengths:
        for delta, radius in ((float(x), r) for x in args.deltas.split(",") for r in args.radius.split(",")):
            for numerator in args.numerators.split(","):
                samples = [int(x) for x in args.value_samples.split(",")] if numerator == "values" else [0]
                for t in samples:
                    metrics = [evaluate(*store[layer], n, sinks=4, window=64, queries=args.queries, delta_rel=delta,
                                        s=args.cluster_samples, t=max(t, 1), numerator=numerator, radius=radius)
                               for layer in layers]
                    base = {"context": n, "delta": delta, "radius": radius, "numerator": numerator, "cluster_samples": args.cluster_samples,
                            "value_samples": t, "layer": "mean"}
                    row = {**base, **{key: round(sum(m[key] for m in metrics) / len(metrics), 4) for key in metrics[0]}}
                    rows.append(row)
                    print(row, flush=True)
                    if args.per_layer:
                        rows += [{**base, "layer": layer, **{key: round(v, 4) for key, v in m.items()}}
                                 for layer, m in zip(layers, metrics)]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "clustergen_error.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {"model": args.model, "layers": layers, "tokens": total, "device": "cpu", "machine": platform.processor() or platform.machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    (args.out / "clustergen_error.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, args.out / "clustergen_error.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("layer", "mean") == "mean"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    key = lambda r: (r.get("numerator", "values"), r["delta"], r["value_samples"], r.get("radius", "norm"))  # noqa: E731
    settings = sorted({key(r) for r in rows})
    for numerator, delta, t, radius in settings:
        sel = [r for r in rows if key(r) == (numerator, delta, t, radius)]
        label = f"{numerator}, delta={delta}" + (f", t={t}" if numerator == "values" else "") + (f", {radius}" if radius != "norm" else "")
        a.plot([r["mem_frac"] for r in sel], [r["rel_err"] for r in sel], "o-" if numerator == "clusters" else "s--", label=label)
        for r in sel:
            a.annotate(f"{r['context'] // 1024}K", (r["mem_frac"], r["rel_err"]), fontsize=7)
    if "drop_err" in rows[0]:
        by_context = {r["context"]: r["drop_err"] for r in rows}
        a.plot([(4 + 64) / n for n in by_context], list(by_context.values()), "kx:", label="window only (dropped)")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("memory / full cache")
    a.set_ylabel("relative error of attention output")
    a.legend(fontsize=6)
    first = settings[0]
    for delta, radius in sorted({(r["delta"], r.get("radius", "norm")) for r in rows}):
        sel = [r for r in rows if (r["delta"], r.get("radius", "norm")) == (delta, radius)
               and (r.get("numerator", "values"), r["value_samples"]) == (first[0], first[2])]
        b.plot([r["context"] for r in sel], [r["clusters"] for r in sel], "o-", label=f"delta={delta}, {radius}")
    ctx = sorted({r["context"] for r in rows})
    b.plot(ctx, ctx, "k:", label="one cluster per token")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("context tokens")
    b.set_ylabel("clusters per KV head")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
