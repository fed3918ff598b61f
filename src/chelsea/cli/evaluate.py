"""``chelsea eval`` (accuracy grid), ``chelsea report`` (its tables and plots) and ``chelsea analyze`` (key similarity)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ChelseaError
from .options import (DEFAULT_MODEL, CapacityOpt, DeviceOpt, DtypeOpt, EveryOpt, ModelOpt, SetOpt, SinkOpt, WindowOpt, app, methods_help,
                      parse_settings, shared_settings, split_list)


@app.command("eval")
def eval_(
    out: Annotated[Path, typer.Option(help="Results folder: results.jsonl (raw, appended), summary.csv/.md, plots. Rerun to resume.")],
    model: ModelOpt = DEFAULT_MODEL,
    tasks: Annotated[str, typer.Option(help="Comma-separated: needle, passkey, multikey, multivalue, multiquery, vartrack, cwe (planted facts), qa (questions on essays), code (questions on standard-library source), ppl.")] = "needle,passkey",
    methods: Annotated[str, typer.Option(help=methods_help("Comma-separated methods."))] = "full,chelsea,streaming,snapkv",
    ratios: Annotated[str, typer.Option(help="Comma-separated fractions of the KV cache removed.")] = "0.5,0.8",
    lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")] = "1024,2048",
    placements: Annotated[str, typer.Option(help="Comma-separated: after (question after the context), before (question first), agnostic (context compressed before the question arrives), streamed (context appended in chunks of 512 tokens, each compressed as it arrives, into a cache whose capacity is the ratio's share of the whole context unless --capacity sets one).")] = "after,before",
    samples: Annotated[int, typer.Option(help="Samples per cell (same seeds for every method).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Prompts run together (same length, no padding).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the task generators.")] = 0,
    ppl_block: Annotated[int, typer.Option(help="ppl: tokens read per forward; the cache compresses after each.")] = 256,
    haystack: Annotated[Path | None, typer.Option(help="Folder of .txt files (default: the essays shipped with the package).")] = None,
    chat_template: Annotated[bool, typer.Option(help="Wrap prompts in the model's chat template, if it has one.")] = True,
    plots: Annotated[bool, typer.Option(help="Draw the PNG plots (needs matplotlib).")] = True,
    sinks: SinkOpt = 4,
    window: WindowOpt = 64,
    compress_every: EveryOpt = None,
    capacity: CapacityOpt = None,
    settings: SetOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Accuracy of each method at each ratio on generated long-context tasks; resumable.

    ``--set`` settings go to every method that has them."""
    from ..evaluation.evaluate import plan, run_eval
    from ..evaluation.report import write_report
    from ..methods import check_settings_known, configure
    from ..models import load_model
    from ..settings import CompressionConfig

    grid = dict(tasks=split_list(tasks, str, "--tasks"), methods=split_list(methods, str, "--methods"),
                ratios=split_list(ratios, float, "--ratios"), lengths=split_list(lengths, int, "--lengths"),
                placements=split_list(placements, str, "--placements"))
    cells = plan(**grid)
    own = parse_settings(settings)
    check_settings_known([m for m in grid["methods"] if m != "full"], own)
    for m in {c.method for c in cells if c.method != "full"}:
        configure(m, own)
    shared = {k: v for k, v in shared_settings(sinks, window, compress_every, capacity).items() if v is not None}
    CompressionConfig(**shared)
    typer.echo(f"{len(cells)} cells x {samples} samples", err=True)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    done = run_eval(lm, tokenizer, out, model_name=model, samples=samples, batch_size=batch_size, seed=seed,
                    ppl_block=ppl_block, haystack=haystack, chat_template=chat_template, settings={**shared, **own}, **grid)
    typer.echo(f"ran {done['ran']} samples, {done['skipped']} already in {out / 'results.jsonl'}", err=True)
    for path in write_report(out, plots=plots):
        typer.echo(f"wrote {path}", err=True)
    typer.echo((out / "summary.md").read_text(encoding="utf-8"))


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="A folder written by chelsea eval.")],
    plots: Annotated[bool, typer.Option(help="Draw the PNG plots (needs matplotlib).")] = True,
) -> None:
    """Rebuild summary.csv, summary.md and the plots from a results folder's results.jsonl."""
    from ..evaluation.report import write_report

    if not (out / "results.jsonl").is_file():
        raise ChelseaError(f"{out} has no results.jsonl; run chelsea eval --out {out} first")
    for path in write_report(out, plots=plots):
        typer.echo(f"wrote {path}", err=True)


@app.command()
def analyze(
    model: ModelOpt = DEFAULT_MODEL,
    tokens: Annotated[int, typer.Option(help="Tokens of prose and of code to read.")] = 4096,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Chunk size of the partition check.")] = 32,
    out: Annotated[Path, typer.Option(help="Folder for analyze_<model>.json/.md/.png.")] = Path("analysis"),
    haystack: Annotated[Path | None, typer.Option(help="Folder of .txt files for the prose (default: the essays shipped with the package).")] = None,
    plots: Annotated[bool, typer.Option(help="Draw the PNG plot (needs matplotlib).")] = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Key similarity vs token distance per layer (prose and code), and the alternating-split check."""
    from ..evaluation.analyze import analyze as run_analysis
    from ..evaluation.analyze import markdown, write
    from ..models import load_model

    if chunk_size < 4 or chunk_size % 2:
        raise ChelseaError(f"--chunk-size must be an even integer >= 4; got {chunk_size}")
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    result = run_analysis(lm, tokenizer, tokens=tokens, chunk_size=chunk_size, haystack=haystack)
    for path in write(result, model, out, plots=plots):
        typer.echo(f"wrote {path}", err=True)
    typer.echo(markdown(result, model))
