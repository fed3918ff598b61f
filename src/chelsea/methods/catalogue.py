"""The registry as text: the methods table and the settings page (``docs/settings.md``), both
generated from the methods' own descriptions, so the CLI's help and the docs cannot drift."""

from __future__ import annotations

import inspect
from pathlib import Path

from ..settings import CompressionConfig, describe
from .base import METHODS


def _default(value) -> str:
    return "None" if value is None else repr(value) if isinstance(value, str) else str(value)


def method_file(cls) -> str:
    """The method's source file, relative to the package (``chelsea/methods/chelsea.py``)."""
    path = Path(inspect.getfile(cls))
    return "/".join(path.parts[path.parts.index("chelsea"):]) if "chelsea" in path.parts else path.name


def methods_table() -> str:
    """A Markdown table: name, file, paper, what it does."""
    lines = ["| method | file | paper | what it does |", "|---|---|---|---|"]
    for name, cls in METHODS.items():
        lines.append(f"| `{name}` | `{method_file(cls)}` | {cls.paper or '-'} | {cls.summary} |")
    return "\n".join(lines)


def settings_page() -> str:
    """The settings page: the shared settings, then every method's own, each with its default."""
    out = ["# Settings", "",
           "Generated from the settings' own descriptions (`chelsea methods --markdown`); do not edit by hand.",
           "On the command line the shared settings have their own flags (`--ratio`, `--sinks`, `--window`,",
           "`--compress-every`); a method's own settings are given as `--set NAME=VALUE`. In Python they are",
           "keyword arguments of `ClusteredCache` (or fields of the method's dataclass).", "",
           "## Shared by every method (`CompressionConfig`)", "", "| setting | default | meaning |", "|---|---|---|"]
    out += [f"| `{n}` | `{_default(d)}` | {h} |" for n, d, h in describe(CompressionConfig)]
    for name, cls in METHODS.items():
        rows = cls.settings()
        out += ["", f"## `{name}` (`{cls.__name__}`, {method_file(cls)})", "", cls.summary + ".", ""]
        if rows:
            out += ["| setting | default | meaning |", "|---|---|---|"]
            out += [f"| `{n}` | `{_default(d)}` | {h} |" for n, d, h in rows]
        else:
            out.append("No settings of its own.")
    return "\n".join(out) + "\n"
