"""``chelsea bench``: prefill and decoding speed, memory and KV bytes, full cache vs compressed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ChelseaError
from ..settings import CompressionConfig
from .options import DEFAULT_MODEL, DeviceMapOpt, DeviceOpt, DtypeOpt, SetOpt, app, methods_help, parse_settings, split_list, table

COLUMNS = [("context", "context"), ("batch", "batch"), ("method", "method"), ("ratio", "ratio"), ("prefill_s", "prefill s"),
           ("prefill_vs_full", "prefill x full"), ("scoring", "scoring"), ("decode_ms_per_token", "decode ms/step"),
           ("tokens_per_s", "tokens/s"), ("end_to_end_s", "end to end s"), ("kv_MiB", "KV MiB"), ("peak_GiB", "peak GiB"),
           ("speedup_vs_full", "speed-up"), ("bandwidth_limit_speedup", "bytes limit")]


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="A preset with random weights (llama3-8b, mistral-7b, qwen2.5-7b, qwen2.5-0.5b) or a model name/path as elsewhere.")] = DEFAULT_MODEL,
    methods: Annotated[str, typer.Option(help=methods_help("Comma-separated methods to compare with the full cache."))] = "chelsea",
    ratios: Annotated[str, typer.Option(help="Comma-separated ratios.")] = "0.8",
    contexts: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")] = "4096",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1",
    max_batch: Annotated[
        int | None,
        typer.Option("--max-batch", help="Instead of --batches: search the largest batch that fits (up to this many) for each method, and its throughput."),
    ] = None,
    decode_tokens: Annotated[int, typer.Option(help="Timed decoding steps per configuration.")] = 32,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option("--cuda-graphs/--no-cuda-graphs",
                     help="Replay decoding steps from CUDA graphs; 'full' is then the uncompressed cache in the same buffers and "
                          "kernel. Off: eager transformers steps, 'full' is StaticCache + SDPA. Default: on for one CUDA device."),
    ] = None,
    fuse: Annotated[
        bool | None,
        typer.Option("--fuse/--no-fuse",
                     help="Compile the decoder layers (torch.compile) so the graphed step runs fused norms, rotary and activations; "
                          "the cache update and attention stay outside. Needs --cuda-graphs. Default: on with CUDA graphs."),
    ] = None,
    prefill_batch: Annotated[
        int | None,
        typer.Option("--prefill-batch", help="Prefill this many prompts at a time (needs CUDA graphs): lower peak memory, larger batches. Default: all at once."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="A tokenizer folder for a preset (it has none), so chelsea and kvzip score as in generate and eval "
                     "(chelsea's learned scorer is fitted on prompts the tokenizer writes; kvzip reconstructs the context); "
                     "without it a preset's prefill ranks by the last queries (the 'scoring' column says which)."),
    ] = None,
    settings: SetOpt = None,
    repeats: Annotated[int, typer.Option(help="Measure every configuration this many times (after the warm-up); the medians are shown, every run is in --out.")] = 1,
    answer_tokens: Annotated[int, typer.Option(help="Answer length of the end-to-end column: the prefill plus this many decoding steps.")] = 256,
    out: Annotated[Path | None, typer.Option(help="Write the records as JSON to this file.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
) -> None:
    """Prefill time (scoring and compression included), decode time per token, peak memory and KV bytes: full cache vs compressed.

    Tensor parallel: torchrun --nproc-per-node N -m chelsea.cli bench ... (rank 0 writes; records carry world_size).
    """
    from ..evaluation.bench import run as run_bench
    from ..methods import check_settings_known
    from ..runtime import method_choices

    method_list = split_list(methods, str, "--methods")
    for m in method_list:
        if m not in method_choices():
            raise ChelseaError(f"--methods: {m!r} is not one of {', '.join(method_choices())}")
    own = parse_settings(settings)
    check_settings_known([m for m in method_list if m != "full"], own)
    if max_batch is not None and max_batch < 1:
        raise ChelseaError(f"--max-batch must be at least 1; got {max_batch}")
    if repeats < 1 or answer_tokens < 1:
        raise ChelseaError("--repeats and --answer-tokens must be at least 1")
    ratio_list = split_list(ratios, float, "--ratios")
    for r in ratio_list:
        CompressionConfig(ratio=r)
    records = run_bench(model, method_list, ratio_list, split_list(contexts, int, "--contexts"), split_list(batches, int, "--batches"),
                        decode_tokens, device, dtype, progress=lambda r: typer.echo(json.dumps(r), err=True),
                        device_map=device_map, max_batch=max_batch, cuda_graph=cuda_graphs, fuse=fuse, prefill_batch=prefill_batch,
                        tokenizer=tokenizer, settings=own, repeats=repeats, answer_tokens=answer_tokens)
    shown = [{**r, "peak_GiB": f"{r.get('peak_mem_bytes', 0) / 2**30:.1f}", "kv_MiB": f"{r.get('kv_bytes', 0) / 2**20:.0f}"} for r in records]
    columns = list(COLUMNS)
    if max_batch is not None:
        columns[-2] = ("throughput_vs_full", "tokens/s vs full")
    typer.echo(table([{k: r.get(k, r.get("error", "")) for k, _ in columns} for r in shown], columns))
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=2))
