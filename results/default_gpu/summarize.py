"""Tables of the 2026-12-07 (second) GPU run of the default: the folders and files here, with the
full cache and the earlier cells from ../grid_gpu beside them.

    python results/default_gpu/summarize.py       # prints the markdown tables of README.md
"""

import collections
import json
import math
import pathlib

HERE = pathlib.Path(__file__).parent
GRID = HERE.parent / "grid_gpu"
TASKS = ["needle", "multikey", "multivalue", "vartrack", "qa", "code"]
LENGTHS = [2048, 8192, 16384]


def cells(folder: pathlib.Path, label: str | None = None) -> dict:
    """(label, ratio, placement, length, task) -> scores; ``label`` replaces the method name."""
    out = collections.defaultdict(list)
    for line in open(folder / "results.jsonl"):
        row = json.loads(line)
        ratio = 0.0 if row["method"] == "full" else row["ratio"]
        out[(label or row["method"], ratio, row["placement"], row["length"], row["task"])].append(row["score"])
    return out


def mean(values) -> float | None:
    return 100 * sum(values) / len(values) if values else None


def fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(rows: list[tuple[str, float, str]], data: dict, tasks=TASKS) -> None:
    """One line per (label, ratio, placement): each length's mean over ``tasks`` (every task 20 samples) and their mean."""
    print("| method | removed | placement | " + " | ".join(f"{n // 1024}K" for n in LENGTHS) + " | mean |")
    print("|---|---|---|" + "---|" * (len(LENGTHS) + 1))
    for label, ratio, placement in rows:
        means = []
        for length in LENGTHS:
            per = [data.get((label, ratio, placement, length, t), []) for t in tasks]
            means.append(None if any(len(v) < 20 for v in per) else sum(mean(v) for v in per) / len(per))
        known = [m for m in means if m is not None]
        total = sum(known) / len(known) if len(known) == len(means) else None
        print(f"| {label} | {ratio} | {placement} | " + " | ".join(fmt(m) for m in means) + f" | {fmt(total)} |")


def per_task(rows: list[tuple[str, float, str]], data: dict) -> None:
    print("| method | removed | placement | " + " | ".join(TASKS) + " |")
    print("|---|---|---|" + "---|" * len(TASKS))
    for label, ratio, placement in rows:
        values = []
        for t in TASKS:
            per = [data.get((label, ratio, placement, n, t), []) for n in LENGTHS]
            values.append(None if any(len(v) < 20 for v in per) else sum(mean(v) for v in per) / len(per))
        print(f"| {label} | {ratio} | {placement} | " + " | ".join(fmt(v) for v in values) + " |")


def accuracy() -> None:
    data = {**cells(GRID / "learned", None), **cells(HERE / "stream", "chelsea (default, fixed)"), **cells(HERE / "hi", "chelsea (default)")}
    old = cells(GRID / "learned")
    data.update({("chelsea (default, before the fix)", *k[1:]): v for k, v in old.items() if k[0] == "chelsea"})
    data.update({("chelsea (default, ../grid_gpu)", *k[1:]): v for k, v in old.items() if k[0] == "chelsea"})
    data.update(cells(GRID / "hi"))
    print("## Streamed, 80% removed (six tasks)\n")
    rows = [("full", 0.0, "after"), ("chelsea (default, before the fix)", 0.8, "streamed"), ("chelsea (default, fixed)", 0.8, "streamed"),
            ("chelsea (default, ../grid_gpu)", 0.8, "agnostic")]
    table(rows, data)
    print()
    per_task(rows, data)
    print("\n## 95% and 97% removed (the five tasks reached at every length: code at 16K missing)\n")
    five = [t for t in TASKS if t != "code"]
    rows = [("full", 0.0, "after")]
    for ratio in (0.95, 0.97):
        for placement in ("after", "agnostic"):
            rows += [("chelsea (default)", ratio, placement), ("chelsea", ratio, placement), ("chelsea-paper", ratio, placement)]
    table(rows, data, five)
    print("\n(`chelsea` in these rows: reconstruction scoring, the default before 2026-12-07, from ../grid_gpu/hi)")


def perplexity() -> None:
    groups = collections.defaultdict(list)
    for line in open(HERE / "ppl" / "results.jsonl"):
        row = json.loads(line)
        groups[(row["length"], row["method"], row["ratio"])].append(row)
    print("\n## Perplexity (token-weighted over 20 samples, read 256 tokens at a time)\n")
    print("| length | method | removed | samples | ppl | vs full | KV kept |")
    print("|---|---|---|---|---|---|---|")
    full = {}
    for (length, method, ratio), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        ppl = math.exp(sum(r["nll_sum"] for r in rows) / sum(r["tokens"] for r in rows))
        if method == "full":
            full[length] = ppl
        versus = f"{100 * (ppl / full[length] - 1):+.1f}%" if length in full and method != "full" else "-"
        print(f"| {length} | {method} | {ratio} | {len(rows)} | {ppl:.2f} | {versus} | {rows[0]['kv_fraction']} |")


def costs() -> None:
    bench = json.load(open(HERE / "bench_e2e.json"))
    rows = bench if isinstance(bench, list) else bench.get("records", bench.get("rows", []))
    print("\n## One request (qwen2.5-7b preset, batch 1, 256-token answer)\n")
    print("| context | method | prefill s (runs) | x plain | decode ms/step | end to end s | vs full |")
    print("|---|---|---|---|---|---|---|")
    full = {r["context"]: r["end_to_end_s"] for r in rows if r["method"] == "full"}
    for r in rows:
        runs = ", ".join(f"{v:.3f}" for v in r["prefill_runs_s"])
        print(f"| {r['context']} | {r['method']} | {r['prefill_s']:.3f} ({runs}) | {r['prefill_vs_full']:.3f} | "
              f"{r['decode_ms_per_token']:.3f} | {r['end_to_end_s']:.3f} | {r['end_to_end_s'] / full[r['context']]:.3f} |")
    for name in ("serve_shared", "serve_distinct"):
        runs = json.load(open(HERE / f"{name}.json"))["rows"]
        print(f"\n## {name} (qwen2.5-7b preset, 32,000-token documents, 64 clients, 64 tokens, 16 GiB)\n")
        print("| run | method | requests/s | x full | TTFT p50 s | TTFT p90 s | decode steps | peak batch |")
        print("|---|---|---|---|---|---|---|---|")
        full = {r["run"]: r["requests_per_s"] for r in runs if r["method"] == "full"}
        for r in runs:
            print(f"| {r['run']} | {r['method']} | {r['requests_per_s']:.2f} | {r['requests_per_s'] / full[r['run']]:.2f} | "
                  f"{r['ttft_p50_s']:.2f} | {r['ttft_p90_s']:.2f} | {r['decode_steps']} | {r['peak_batch']} |")


if __name__ == "__main__":
    accuracy()
    perplexity()
    costs()
