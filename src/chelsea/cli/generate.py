"""``chelsea generate`` (one answer with its KV statistics) and ``chelsea demo`` (a pass key, full vs compressed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ChelseaError
from ..settings import CompressionConfig
from .options import (DEFAULT_MODEL, CapacityOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, EveryOpt, ModelOpt, SetOpt, SinkOpt, WindowOpt, app,
                      fmt_bytes, methods_help, parse_settings, shared_settings, split_list, table)


def _method(name: str, items: list[str] | None):
    """``full``, or the method ``name`` with the ``--set`` settings (all of which it must have)."""
    from ..methods import check_settings_known, configure
    from ..runtime import method_choices

    if name not in method_choices():
        raise ChelseaError(f"--method must be one of {', '.join(method_choices())}; got {name!r}")
    settings = parse_settings(items)
    if name == "full":
        if settings:
            raise ChelseaError("--set has nothing to set for the full cache")
        return "full"
    check_settings_known([name], settings)
    return configure(name, settings)


@app.command()
def generate(
    prompt_file: Annotated[Path, typer.Option("--prompt-file", "-f", help="Text file with the (long) context.")],
    question: Annotated[str, typer.Option("--question", "-q", help="Question appended after the file's text.")] = "",
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help=methods_help("The compression method."))] = "chelsea",
    ratio: Annotated[float, typer.Option(help="Fraction of the KV cache removed, in [0, 1); 0.8 keeps 20%.")] = 0.5,
    sinks: SinkOpt = 4,
    window: WindowOpt = 64,
    compress_every: EveryOpt = None,
    capacity: CapacityOpt = None,
    settings: SetOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 32,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    chat_template: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template, if it has one.")] = True,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option("--cuda-graphs/--no-cuda-graphs",
                     help="Decode with steps replayed from a CUDA graph (same greedy tokens). Default: on when the model is on "
                          "one CUDA device; off: model.generate."),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
) -> None:
    """Generate an answer to the file's text + question, with the full or a compressed cache.

    Tensor parallel: torchrun --nproc-per-node N -m chelsea.cli generate ... (rank 0 prints).
    """
    from ..models import load_model, world_size
    from ..runtime import encode
    from ..runtime import generate as run

    config = CompressionConfig(ratio=ratio, **shared_settings(sinks, window, compress_every, capacity))
    chosen = _method(method, settings)
    if not prompt_file.is_file():
        raise ChelseaError(f"--prompt-file {prompt_file} does not exist")
    lm, tokenizer = load_model(model, device=device, dtype=dtype, device_map=device_map)
    inputs = encode(tokenizer, prompt_file.read_text(encoding="utf-8"), question, chat_template=chat_template)
    result = run(lm, tokenizer, inputs, method=chosen, config=config, max_new_tokens=max_new_tokens, cuda_graph=cuda_graphs)
    row = {"model": model, **result.to_dict(), "world_size": world_size()}
    if json_out:
        typer.echo(json.dumps(row))
        return
    typer.echo(result.answer)
    typer.echo(
        f"\n[{result.method}{'' if result.ratio is None else f' ratio={result.ratio}'}] tokens seen {result.tokens_seen}, "
        f"KV entries {result.kv_entries} ({'compressed' if result.compressed else 'not compressed'}), KV bytes "
        f"{fmt_bytes(result.kv_bytes)} of {fmt_bytes(result.kv_bytes_full)}, prefill {result.prefill_s:.2f} s, "
        f"decode {result.decode_s:.2f} s",
        err=True,
    )


@app.command()
def demo(
    model: ModelOpt = DEFAULT_MODEL,
    tokens: Annotated[int, typer.Option(help="Length of each context in tokens.")] = 2000,
    ratios: Annotated[str, typer.Option(help="Comma-separated compression ratios to compare with the full cache.")] = "0.5,0.8",
    samples: Annotated[int, typer.Option(help="Prompts to try (different keys, passages and depths).")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the first sample.")] = 0,
    context: Annotated[
        str,
        typer.Option(help="filler: repetitive sentences (what SmolLM2-135M can search); haystack: long essays (use a larger model, e.g. qwen2.5-coder-0.5b)."),
    ] = "filler",
    haystack: Annotated[Path | None, typer.Option(help="Folder of .txt files for --context haystack (default: the essays shipped with the package).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 12,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_path: Annotated[Path | None, typer.Option("--json-out", help="Also write the rows as JSON to this file.")] = None,
) -> None:
    """Hide a pass key in a long text and ask for it with the full cache and with chelsea (the default method)."""
    from ..haystack import find_haystack
    from ..models import load_model

    ratio_values = split_list(ratios, float, "--ratios")
    if samples < 1:
        raise ChelseaError(f"--samples must be at least 1; got {samples}")
    configs = [CompressionConfig(ratio=r) for r in ratio_values]
    if context not in ("filler", "haystack"):
        raise ChelseaError(f"--context must be filler or haystack; got {context!r}")
    source = find_haystack(haystack) if context == "haystack" else None
    if context == "haystack" and source is None:
        raise ChelseaError("--context haystack needs a folder of .txt files: pass --haystack DIR or set CHELSEA_HAYSTACK")
    typer.echo(f"Loading {model} ...", err=True)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    typer.echo(f"Context: about {tokens} tokens of {'haystack text from ' + source.name if source else 'filler'}; "
               f"{samples} prompts x {1 + len(configs)} caches. The first chelsea run also fits the model's learned scorer "
               "(once per model, stored for later runs; the default model's ships with chelsea).\n", err=True)
    runs = [("full", None), *[("chelsea", c) for c in configs]]
    rows = _demo_rows(lm, tokenizer, runs, samples, tokens, seed, source, max_new_tokens)
    _print_demo(rows, runs)
    if json_path is not None:
        json_path.write_text(json.dumps({"model": model, "tokens": tokens, "rows": rows}, indent=2))


def _demo_rows(lm, tokenizer, runs, samples: int, tokens: int, seed: int, source, max_new_tokens: int) -> list[dict]:
    """One row per prompt and cache, a progress line for each as it finishes."""
    from ..evaluation.prompts import is_correct, passkey_prompt
    from ..runtime import encode
    from ..runtime import generate as run

    rows = []
    for i in range(samples):
        depth = (i + 1) / (samples + 1)
        prompt = passkey_prompt(tokenizer, tokens, depth=depth, seed=seed + i, haystack=source)
        inputs = encode(tokenizer, prompt.context, prompt.question, chat_template=False, answer_prefix=prompt.answer_prefix)
        for method, config in runs:
            start = time.perf_counter()
            result = run(lm, tokenizer, inputs, method=method, config=config, max_new_tokens=max_new_tokens)
            row = {"sample": i, "depth": round(depth, 2), "expected": prompt.answer, **result.to_dict()}
            row.update(
                correct=is_correct(result.answer, prompt.answer),
                answer_short=result.answer.splitlines()[0][:24] if result.answer else "",
                kv_kept=f"{100 * result.kv_bytes / result.kv_bytes_full:.0f}%",
                bytes_h=fmt_bytes(result.kv_bytes),
                decode_ms=f"{1000 * result.decode_s / max(1, result.new_tokens - 1):.1f}",
            )
            rows.append(row)
            typer.echo(f"  [{len(rows)}/{samples * len(runs)}] sample {i + 1}, {method} ratio {result.ratio}: "
                       f"{'right' if row['correct'] else 'wrong'}, {time.perf_counter() - start:.1f} s", err=True)
    return rows


def _print_demo(rows: list[dict], runs) -> None:
    shown = [{**r, "right": "yes" if r["correct"] else "no"} for r in rows]
    typer.echo(table(shown, [("sample", "sample"), ("expected", "key"), ("method", "method"), ("ratio", "ratio"),
                             ("answer_short", "answer"), ("right", "right"), ("kv_entries", "KV entries"), ("bytes_h", "KV bytes"),
                             ("kv_kept", "kept"), ("prefill_s", "prefill s"), ("decode_ms", "decode ms/token")]))
    typer.echo("\nRight answers:")
    for method, config in runs:
        ratio = 0.0 if config is None else config.ratio
        mine = [r for r in rows if r["method"] == method and r["ratio"] == ratio]
        typer.echo(f"  {method:8} ratio {ratio:<4}  {sum(r['correct'] for r in mine)}/{len(mine)}")
    typer.echo("KV entries: stored per layer and KV head (mean). Kept: KV bytes held / bytes of the full cache.")
