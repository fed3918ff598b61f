"""What the commands share: the typer app, common options, and method settings from ``--set``.

A method's own settings are not separate flags: ``--set NAME=VALUE`` (repeatable) takes any of
them, checked against the registry (``chelsea methods`` lists them), so a new method's settings
reach every command without a line here.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import ChelseaError
from ..methods import METHODS
from ..models import BUILTIN_MODELS, DEFAULT_MODEL
from ..settings import CompressionConfig, describe, parse_value

app = typer.Typer(
    help="Long-context LLM inference with a clustered KV cache: important entries kept exact, the rest merged into "
         "weighted centroids. `chelsea methods` lists the compression methods and their settings.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def methods_help(lead: str) -> str:
    """``lead`` followed by every registered method and what it does (from the registry)."""
    return lead + " full: the uncompressed cache; " + "; ".join(f"{name}: {cls.summary}" for name, cls in METHODS.items()) + "."


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help=f"Built-in model ({', '.join(BUILTIN_MODELS)}), transformers model id, local folder or .gguf file.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16.")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option("--device-map", help="Spread the layers over the visible GPUs with accelerate (e.g. auto). For tensor parallelism launch with torchrun instead."),
]
SinkOpt = Annotated[int, typer.Option("--sinks", help="First tokens never merged or evicted.")]
WindowOpt = Annotated[int, typer.Option("--window", help="Most recent tokens never merged or evicted.")]
EveryOpt = Annotated[int | None, typer.Option("--compress-every", help="While decoding, compress again after this many new tokens (default: the method's own).")]
CapacityOpt = Annotated[int | None, typer.Option("--capacity", help="A fixed budget instead of the ratio's: each layer keeps up to this many entries per KV head and compresses only what goes beyond (a long chat, a context read in chunks).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="A method setting as NAME=VALUE (repeatable), e.g. --set exact_share=0.7, given to every "
                               "method that has it; METHOD.NAME=VALUE for one method only (--set chelsea.importance=local); "
                               "`chelsea methods NAME` lists a method's settings and defaults."),
]


def parse_settings(items: list[str] | None) -> dict:
    """``--set`` items as ``{name: value}``, values typed like the setting's default."""
    defaults = {name: default for cls in METHODS.values() for name, default, _ in describe(cls)}
    out = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        method, dot, bare = name.rpartition(".")
        if dot and method not in METHODS:
            raise ChelseaError(f"--set {name}: {method!r} is not a method (`chelsea methods` lists them)")
        if not sep or not name:
            raise ChelseaError(f"--set takes NAME=VALUE; got {item!r}")
        if bare in CompressionConfig.__dataclass_fields__:
            flag = {"sink_tokens": "--sinks", "compress_every": "--compress-every"}.get(bare, "--" + bare)
            raise ChelseaError(f"{bare} is a shared setting: use {flag} instead of --set")
        out[name] = parse_value(text, defaults.get(bare))
    return out


def shared_settings(sinks: int, window: int, compress_every: int | None, capacity: int | None = None) -> dict:
    return {"sink_tokens": sinks, "window": window, "compress_every": compress_every, "capacity": capacity}


def split_list(text: str, cast, flag: str) -> list:
    """A comma-separated option as a list of ``cast`` values."""
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ChelseaError(f"{flag} must be a comma-separated list; got {text!r}") from err


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table of ``rows`` with ``(key, title)`` columns."""
    cells = [[title for _, title in columns]] + [[str(row[key]) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj))


__all__ = ["DEFAULT_MODEL", "app"]
