"""Tables and plots from the raw rows of ``chelsea eval`` (``results.jsonl``).

- ``summary.csv``: one line per task x placement x length x method x ratio: samples, mean score
  (question tasks) or perplexity (``ppl``, from the summed log-likelihoods), mean KV fraction.
- ``summary.md``: the same, readable: a headline table at one ratio (0.8 when run), the question
  tasks at that ratio for each placement and length (with the mean over tasks), then one table
  per task and placement with lengths as columns and the full cache as the first row.
- ``accuracy_vs_ratio.png``: score (or perplexity) against compression ratio, one panel per task
  and placement, one line per method, the full cache dashed.
- ``needle_heatmap_<ratio>.png``: needle accuracy over length x depth, one panel per method.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from ..errors import MissingDependencyError
from ..methods import method_names
from .evaluate import load_rows

FIELDS = ["task", "placement", "length", "method", "ratio", "samples", "score", "ppl", "kv_fraction"]


def _ratio_label(ratio) -> str:
    return "-" if ratio is None else f"{ratio:g}"


def _method_order(method: str) -> tuple:
    order = ["full", *method_names()]
    return (order.index(method) if method in order else len(order), method)


def summarise(rows: list[dict]) -> list[dict]:
    """Aggregate rows per task x placement x length x method x ratio."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["placement"], r["length"], r["method"], r["ratio"])].append(r)
    out = []
    for (task, placement, length, method, ratio), members in groups.items():
        fractions = [m["kv_fraction"] for m in members if m.get("kv_fraction") is not None]
        entry = {"task": task, "placement": placement, "length": length, "method": method, "ratio": ratio,
                 "samples": len(members), "score": None, "ppl": None,
                 "kv_fraction": round(sum(fractions) / len(fractions), 4) if fractions else None}
        if task == "ppl":
            entry["ppl"] = round(math.exp(sum(m["nll_sum"] for m in members) / sum(m["tokens"] for m in members)), 3)
        else:
            entry["score"] = round(sum(m["score"] for m in members) / len(members), 4)
        out.append(entry)
    out.sort(key=lambda e: (e["task"], e["placement"], e["length"], _method_order(e["method"]), e["ratio"] or 0))
    return out


def _value(entry: dict) -> float:
    return entry["ppl"] if entry["task"] == "ppl" else entry["score"]


def _fmt(entry: dict | None) -> str:
    if entry is None:
        return ""
    return f"{entry['ppl']:.2f}" if entry["task"] == "ppl" else f"{100 * entry['score']:.0f}"


def _settings(summary: list[dict]) -> list[tuple[str, float | None]]:
    return sorted({(e["method"], e["ratio"]) for e in summary}, key=lambda s: (_method_order(s[0]), s[1] or 0))


def markdown(summary: list[dict], headline_ratio: float = 0.8) -> str:
    """The Markdown report: headline at ``headline_ratio`` (or the ratio closest to it), then per task."""
    lines = ["# Evaluation summary", "",
             "Question tasks: percent of expected answers found in the reply (mean over samples). "
             "`ppl`: perplexity (lower is better). `full` is the uncompressed cache; `ratio` is the "
             "fraction of KV entries removed; `kv` is the mean measured fraction of the full cache's KV bytes.", ""]
    ratios = sorted({e["ratio"] for e in summary if e["ratio"] not in (None, 0.0)})
    columns = sorted({(e["task"], e["placement"]) for e in summary}, key=lambda c: (c[0] == "ppl", c))
    if ratios:
        r0 = min(ratios, key=lambda r: abs(r - headline_ratio))
        lines += [f"## All tasks at ratio {r0:g} (mean over lengths)", ""]
        lines += ["| method | ratio | " + " | ".join(f"{t} ({p})" if p != "-" else t for t, p in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for method, ratio in _settings(summary):
            if ratio not in (r0, 0.0, None):
                continue
            cells = []
            for task, placement in columns:
                hits = [e for e in summary if (e["task"], e["placement"], e["method"], e["ratio"]) == (task, placement, method, ratio)]
                if not hits:
                    cells.append("")
                    continue
                mean = sum(_value(e) for e in hits) / len(hits)
                cells.append(f"{mean:.2f}" if task == "ppl" else f"{100 * mean:.0f}")
            lines.append(f"| {method} | {_ratio_label(ratio)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _placement_tables(summary, r0)
    for task, placement in columns:
        part = [e for e in summary if (e["task"], e["placement"]) == (task, placement)]
        lengths = sorted({e["length"] for e in part})
        title = task if placement == "-" else f"{task}, {_placement_phrase(placement)}"
        lines += [f"## {title}", "", "| method | ratio | kv | " + " | ".join(str(n) for n in lengths) + " | n |",
                  "|---|---|---|" + "---|" * (len(lengths) + 1)]
        for method, ratio in _settings(part):
            row = {e["length"]: e for e in part if (e["method"], e["ratio"]) == (method, ratio)}
            fractions = [e["kv_fraction"] for e in row.values() if e["kv_fraction"] is not None]
            kv = f"{sum(fractions) / len(fractions):.2f}" if fractions else ""
            n = min(e["samples"] for e in row.values())
            lines.append(f"| {method} | {_ratio_label(ratio)} | {kv} | " + " | ".join(_fmt(row.get(k)) for k in lengths) + f" | {n} |")
        lines.append("")
    return "\n".join(lines)


def _placement_phrase(placement: str) -> str:
    """How a placement reads in a heading: ``after`` -> "question after the context"."""
    if placement == "agnostic":
        return "context compressed before the question"
    if placement == "streamed":
        return "context streamed in chunks, compressed as it arrives, before the question"
    return f"question {placement} the context"


def _placement_tables(summary: list[dict], ratio: float) -> list[str]:
    """Question tasks at ``ratio``, one table per placement and length, with each method's mean
    over the tasks (left blank where the method was not run on all of them)."""
    lines = []
    questions = [e for e in summary if e["task"] != "ppl" and e["ratio"] in (ratio, 0.0, None)]
    for placement, length in sorted({(e["placement"], e["length"]) for e in questions}):
        part = [e for e in questions if (e["placement"], e["length"]) == (placement, length)]
        tasks = sorted({e["task"] for e in part})
        lines += [f"### {_placement_phrase(placement).capitalize()}, {length} tokens, ratio {ratio:g}", "",
                  "| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
        for method, r in _settings(part):
            cells = {e["task"]: e for e in part if (e["method"], e["ratio"]) == (method, r)}
            mean = f"{100 * sum(e['score'] for e in cells.values()) / len(cells):.0f}" if len(cells) == len(tasks) else ""
            lines.append(f"| {method} | " + " | ".join(_fmt(cells.get(t)) for t in tasks) + f" | {mean} |")
        lines.append("")
    return lines


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError("plots need matplotlib: pip install matplotlib") from err
    return plt


def plot_accuracy(summary: list[dict], path: Path) -> None:
    plt = _plt()
    panels = sorted({(e["task"], e["placement"]) for e in summary}, key=lambda c: (c[0] == "ppl", c))
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    methods = sorted({e["method"] for e in summary}, key=_method_order)
    for ax, (task, placement) in zip(axes.flat, panels):
        part = [e for e in summary if (e["task"], e["placement"]) == (task, placement)]
        for method in methods:
            by_ratio = defaultdict(list)
            for e in part:
                if e["method"] == method:
                    by_ratio[e["ratio"]].append(_value(e))
            if not by_ratio:
                continue
            if method == "full" or None in by_ratio:
                value = sum(next(iter(by_ratio.values()))) / len(next(iter(by_ratio.values())))
                style = dict(ls="--", color="black") if method == "full" else dict(ls=":")
                ax.axhline(value, label=method if method == "full" else f"{method} (own budget)", **style)
                continue
            xs = sorted(by_ratio)
            ax.plot(xs, [sum(by_ratio[x]) / len(by_ratio[x]) for x in xs], marker="o", label=method)
        ax.set_title(task if placement == "-" else f"{task}, question {placement}", fontsize=9)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel("perplexity" if task == "ppl" else "score")
        if task != "ppl":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_points(summary: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per placement and method: ``(KV bytes kept as a fraction of the full cache's, mean score)``
    at each ratio, over the question tasks, sorted by bytes. Bytes, not the ratio: a merged entry
    costs what a kept one does, and a method that only masks keeps the full cache's bytes."""
    cells = defaultdict(list)
    for e in summary:
        if e["task"] != "ppl" and e.get("kv_fraction") is not None and e.get("score") is not None:
            cells[(e["placement"], e["method"], e["ratio"])].append(e)
    points: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for (placement, method, _), entries in cells.items():
        fraction = sum(e["kv_fraction"] for e in entries) / len(entries)
        points[placement][method].append((round(fraction, 4), sum(e["score"] for e in entries) / len(entries)))
    return {p: {m: sorted(v) for m, v in by_method.items()} for p, by_method in points.items()}


def plot_pareto(summary: list[dict], path: Path) -> None:
    """Accuracy against KV bytes kept, one line per method, a panel per placement."""
    plt = _plt()
    points = pareto_points(summary)
    fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 3.4), squeeze=False)
    for ax, (placement, by_method) in zip(axes.flat, sorted(points.items())):
        for method in sorted(by_method, key=_method_order):
            xs, ys = zip(*by_method[method])
            ax.plot(xs, ys, marker="o", label=method, **(dict(color="black") if method == "full" else {}))
        ax.set_title(f"question {placement}" if placement != "-" else "all", fontsize=9)
        ax.set_xlabel("KV bytes kept (fraction of the full cache)")
        ax.set_ylabel("mean score over the question tasks")
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_needle(rows: list[dict], out_dir: Path) -> list[Path]:
    """One heatmap figure per ratio (the full cache in each), panels per method and placement."""
    plt = _plt()
    needle = [r for r in rows if r["task"] == "needle" and r.get("depth") is not None]
    written = []
    for ratio in sorted({r["ratio"] for r in needle if r["ratio"] not in (0.0, None)}):
        chosen = [r for r in needle if r["ratio"] in (ratio, 0.0)]
        methods = sorted({r["method"] for r in chosen}, key=_method_order)
        placements = sorted({r["placement"] for r in chosen})
        lengths = sorted({r["length"] for r in chosen})
        depths = sorted({r["depth"] for r in chosen})
        fig, axes = plt.subplots(len(placements), len(methods), figsize=(2.4 * len(methods), 2.4 * len(placements)), squeeze=False)
        for i, placement in enumerate(placements):
            for j, method in enumerate(methods):
                grid = [[float("nan")] * len(lengths) for _ in depths]
                for di, d in enumerate(depths):
                    for li, n in enumerate(lengths):
                        hits = [r["score"] for r in chosen if (r["method"], r["placement"], r["length"], r["depth"]) == (method, placement, n, d)]
                        if hits:
                            grid[di][li] = sum(hits) / len(hits)
                ax = axes[i][j]
                ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
                ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
                ax.set_title(f"{method}, q. {placement}", fontsize=8)
                if j == 0:
                    ax.set_ylabel("depth")
                if i == len(placements) - 1:
                    ax.set_xlabel("length")
        fig.suptitle(f"needle accuracy at ratio {ratio:g} (full cache for reference)", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"needle_heatmap_{ratio:g}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write summary.csv, summary.md and (with matplotlib) the plots; returns the files written."""
    out_dir = Path(out_dir)
    rows = load_rows(out_dir)
    summary = summarise(rows)
    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(summary)
    (out_dir / "summary.md").write_text(markdown(summary), encoding="utf-8")
    written = [out_dir / "summary.csv", out_dir / "summary.md"]
    if plots and summary:
        plot_accuracy(summary, out_dir / "accuracy_vs_ratio.png")
        written.append(out_dir / "accuracy_vs_ratio.png")
        if pareto_points(summary):
            plot_pareto(summary, out_dir / "accuracy_vs_bytes.png")
            written.append(out_dir / "accuracy_vs_bytes.png")
        written += plot_needle(rows, out_dir)
    return written

