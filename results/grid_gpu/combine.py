"""Tables of the 2026-12-07 GPU grid: the four eval folders here, one label per method and setting.

    python results/grid_gpu/combine.py            # prints the markdown tables used in README.md
"""

import collections
import json
import pathlib

HERE = pathlib.Path(__file__).parent
FOLDERS = {  # folder -> {method in results.jsonl: label}
    "base": {"chelsea": "chelsea (reconstruction)", "kvzip": "kvzip"},
    "learned": {"full": "full", "chelsea": "chelsea learned"},
    "fit": {"chelsea": "chelsea fit"},
    "hi": {"chelsea": "chelsea (reconstruction)", "chelsea-paper": "chelsea-paper"},
}
TASKS = ["needle", "multikey", "multivalue", "vartrack", "qa", "code"]
LENGTHS = [2048, 8192, 16384]


def load():
    cells = collections.defaultdict(list)
    for folder, labels in FOLDERS.items():
        for line in open(HERE / folder / "results.jsonl"):
            row = json.loads(line)
            label = labels[row["method"]]
            ratio = 0.0 if label == "full" else row["ratio"]
            cells[(label, ratio, row["placement"], row["length"], row["task"])].append(row["score"])
    return cells


def mean(values):
    return 100 * sum(values) / len(values) if values else None


def cell_mean(cells, label, ratio, placement, length, tasks=TASKS):
    """Mean over tasks of each task's mean; None unless every task has 20 samples."""
    per_task = [cells.get((label, ratio, placement, length, t), []) for t in tasks]
    if any(len(v) < 20 for v in per_task):
        return None
    return sum(mean(v) for v in per_task) / len(per_task)


def fmt(x):
    return "-" if x is None else f"{x:.1f}"


def main():
    cells = load()
    rows = sorted({(k[0], k[1]) for k in cells}, key=lambda r: (r[1], r[0]))
    for placement in ["after", "agnostic", "streamed"]:
        print(f"\n### {placement}: mean over {', '.join(TASKS)} (per length)\n")
        print("| method | removed | 2K | 8K | 16K | all |")
        print("|---|---|---|---|---|---|")
        for label, ratio in rows:
            values = [cell_mean(cells, label, ratio, placement, n) for n in LENGTHS]
            if all(v is None for v in values):
                continue
            both = None if None in values else sum(values) / 3
            print(f"| {label} | {ratio:.2f} | " + " | ".join(fmt(v) for v in values) + f" | {fmt(both)} |")
    print("\n### per task, mean over 2K / 8K / 16K (after / agnostic / streamed)\n")
    print("| method | removed | " + " | ".join(TASKS) + " |")
    print("|---|---|" + "---|" * len(TASKS))
    for label, ratio in rows:
        out = []
        for t in TASKS:
            parts = []
            for placement in ["after", "agnostic", "streamed"]:
                values = [cells.get((label, ratio, placement, n, t), []) for n in LENGTHS]
                if all(values):
                    parts.append(f"{sum(mean(v) for v in values) / 3:.0f}" if all(len(v) == 20 for v in values) else "-")
            out.append(" / ".join(parts) if parts else "-")
        print(f"| {label} | {ratio:.2f} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()
