"""Run one `chelsea eval` grid for several settings of the compression knobs, loading the model once.

Each variant writes its own results folder (the eval refuses to mix settings in one folder), then
one line per variant with the mean score per method and task is printed.

    python scripts/eval_variants.py OUT_DIR 'name:key=value,key=value' ... -- [chelsea eval grid options]

Grid options: --tasks, --methods, --ratios, --lengths, --placements, --samples, --batch-size
(same meaning as in `chelsea eval`). Knobs are CompressionConfig fields, e.g.
'floor05:surprise_weight=0.3,layer_floor=0.05'.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
from pathlib import Path

from chelsea.config import CompressionConfig
from chelsea.evaluate import load_rows, run_eval
from chelsea.models import load_model
from chelsea.report import _fmt, summarise


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    out, variants = Path(argv[0]), argv[1:split]
    grid = argparse.ArgumentParser()
    grid.add_argument("--model", default="qwen2.5-coder-0.5b")
    for name, default in (("--tasks", "needle"), ("--methods", "guided"), ("--ratios", "0.8"), ("--lengths", "2048"),
                          ("--placements", "agnostic")):
        grid.add_argument(name, default=default)
    grid.add_argument("--samples", type=int, default=20)
    grid.add_argument("--batch-size", type=int, default=20)
    args = grid.parse_args(argv[split + 1 :])
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # chelsea's notes (the fact heads found)
    model, tokenizer = load_model(args.model)
    for variant in variants:
        name, _, spec = variant.partition(":")
        knobs = {k: _value(v) for k, v in (item.split("=", 1) for item in spec.split(",") if item)}
        CompressionConfig(**knobs)
        folder = out / name
        run_eval(model, tokenizer, folder, model_name=args.model, tasks=args.tasks.split(","), methods=args.methods.split(","),
                 ratios=[float(r) for r in args.ratios.split(",")], lengths=[int(n) for n in args.lengths.split(",")],
                 placements=args.placements.split(","), samples=args.samples, batch_size=args.batch_size, knobs=knobs,
                 progress=False)
        cells = collections.defaultdict(list)
        for row in load_rows(folder):
            cells[(row["method"], row["ratio"], row["placement"], row["task"])].append(row)
        means = {k: _fmt(summarise(rows)[0]) for k, rows in sorted(cells.items())}
        print(name, knobs, means, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
