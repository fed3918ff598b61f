"""Settings, each described once and checked in one place.

Every setting is a dataclass field made with :func:`setting`: its metadata holds the one-line
help (from which the CLI's help and ``docs/settings.md`` are generated) and its range, so bad
values get the same kind of message everywhere. :class:`CompressionConfig` holds the four settings
every method shares; :class:`Importance` the settings of importance scoring, which the methods
that rank by importance (``kvzip``, ``chelsea``) carry; every other setting lives on its method's
dataclass (:mod:`chelsea.methods`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ChelseaError


def setting(default: Any, help: str, *, kind: type | None = None, choices: tuple | None = None,
            low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
            none: str | None = None) -> Any:
    """A dataclass field with its help text and its check.

    ``kind``: int, float or bool (taken from the default when not given); ``choices``: the allowed
    strings; ``low``/``high``: bounds, closed unless ``low_open``/``high_open``; ``none``: ``None``
    is allowed and means this (e.g. "the whole cache")."""
    kind = kind or (type(default) if default is not None else None)
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices, "low": low, "high": high,
                                            "low_open": low_open, "high_open": high_open, "none": none})


def _range(meta: dict) -> str:
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        return f"in {'(' if meta['low_open'] else '['}{low:g}, {high:g}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f"{'>' if meta['low_open'] else '>='} {low:g}"
    return f"{'<' if meta['high_open'] else '<='} {high:g}"


def check_value(name: str, value: Any, meta: dict) -> Any:
    """``value`` for the setting ``name`` checked against ``meta`` (ints accepted for floats);
    raises :class:`ChelseaError` saying what is allowed."""
    if value is None and meta.get("none"):
        return None
    kind, choices = meta.get("kind"), meta.get("choices")
    allowed = (f"one of {', '.join(repr(c) for c in choices)}" if choices else
               "true or false" if kind is bool else
               f"{'an integer' if kind is int else 'a number'}" + (f" {_range(meta)}" if meta.get("low") is not None or meta.get("high") is not None else ""))
    if meta.get("none"):
        allowed += f", or None ({meta['none']})"
    bad = ChelseaError(f"{name} must be {allowed}; got {value!r}")
    if choices is not None:
        if value not in choices:
            raise bad
        return value
    if kind is bool:
        if value not in (True, False):
            raise bad
        return bool(value)
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise bad
        if isinstance(value, float) and math.isnan(value):
            raise bad
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            raise bad
        if high is not None and (value > high or (meta.get("high_open") and value == high)):
            raise bad
        return float(value) if kind is float else value
    return value


def check_settings(obj) -> None:
    """Check every :func:`setting` field of the dataclass ``obj`` (frozen or not), normalising ints
    given for floats; raises :class:`ChelseaError` naming the first bad one."""
    for f in dataclasses.fields(obj):
        if "help" in f.metadata:
            object.__setattr__(obj, f.name, check_value(f.name, getattr(obj, f.name), f.metadata))


def describe(cls) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` of every setting of the dataclass ``cls``, nested settings
    dataclasses (such as :class:`Importance`) flattened into their fields."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            out += [(name, getattr(default, name), text) for name, _, text in describe(type(default))]
        elif "help" in f.metadata:
            none = f.metadata.get("none")
            out.append((f.name, default, f.metadata["help"] + (f" (None: {none})" if none else "")))
    return out


def replace_settings(obj, **values):
    """A copy of the settings dataclass ``obj`` with ``values`` set, routed into nested settings
    dataclasses by name; an unknown name raises :class:`ChelseaError` listing the known ones."""
    own = {f.name: f for f in dataclasses.fields(obj)}
    mine, nested = {}, {}
    for name, value in values.items():
        if name in own and not dataclasses.is_dataclass(getattr(obj, name)):
            mine[name] = value
            continue
        for f in own.values():
            inner = getattr(obj, f.name)
            if dataclasses.is_dataclass(inner) and name in {n for n, _, _ in describe(type(inner))}:
                nested.setdefault(f.name, {})[name] = value
                break
        else:
            known = ", ".join(n for n, _, _ in describe(type(obj)))
            raise ChelseaError(f"{name} is not a setting of {getattr(obj, 'name', type(obj).__name__)}; its settings are: {known or 'none'}")
    for f, part in nested.items():
        mine[f] = replace_settings(getattr(obj, f), **part)
    return dataclasses.replace(obj, **mine)


def parse_value(text: str, default: Any) -> Any:
    """A setting's value written on the command line, read by the type of its default."""
    lowered = text.strip().lower()
    if lowered in ("none", "null", ""):
        return None
    if isinstance(default, bool):
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        return text
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class CompressionConfig:
    """The settings every method shares: how much to remove and what never to touch."""

    ratio: float = setting(0.5, "fraction of the KV cache removed; the budget is ceil((1 - ratio) * tokens) entries per "
                                "layer and KV head, never below sink_tokens + window", low=0.0, high=1.0, high_open=True)
    sink_tokens: int = setting(4, "first tokens never merged or evicted (attention sinks)", low=0)
    window: int = setting(64, "most recent tokens never merged or evicted; keeps a question at the end of a prompt exact", low=0)
    compress_every: int | None = setting(None, "while decoding, compress again once this many new tokens have arrived; "
                                              "between compressions the cache holds at most this many entries above budget",
                                         kind=int, low=1, none="the method's own: chelsea-paper's chunk size, 32 otherwise")
    capacity: int | None = setting(None, "a fixed budget instead of the ratio's: each layer keeps up to this many entries per "
                                         "KV head and compresses only what goes beyond (a long chat or a context read in chunks "
                                         "then keeps early text as well as late; ratio > 0 still turns compression on)",
                                   kind=int, low=1, none="the ratio's share of the tokens seen")

    def __post_init__(self) -> None:
        check_settings(self)

    def budget(self, tokens: int) -> int:
        """Entries to keep for a sequence of ``tokens`` tokens."""
        if self.capacity is not None:
            return min(tokens, max(self.capacity, self.sink_tokens + self.window))
        keep = math.ceil(round((1.0 - self.ratio) * tokens, 6))  # round first: 0.3 * 10 is 3.0000000000000004
        return min(tokens, max(keep, self.sink_tokens + self.window))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


IMPORTANCE_SOURCES = ("local", "full", "window", "surprise", "learned")


@dataclass(frozen=True)
class Importance:
    """Where the scores of the methods that rank by importance come from (:mod:`chelsea.scoring`)."""

    importance: str = setting("learned", "where scores come from: a small model per layer fitted once per model to predict the "
                                         "reconstruction-and-fact-head scores from each entry's key and value ('learned'; it "
                                         "also scores every decoded token, and costs no extra pass), context reconstruction "
                                         "whose repeat attends to the sinks and its chunk ('local') or to the whole cache "
                                         "('full'), the prompt's last queries ('window'), or token surprisal alone ('surprise')",
                              choices=IMPORTANCE_SOURCES)
    output_norm: bool = setting(True, "weight each query head's reconstruction attention by the norm of what the entry's value "
                                      "adds to its output, ||W_o v|| (KVzip+'s factor); off: the paper's KVzip scores")
    repeat_chunk: int = setting(2048, "context tokens repeated per reconstruction chunk (the repeat's attention work grows with it)",
                                low=16)
    layer_floor: float = setting(0.2, "least budget of a layer as a fraction of an even split (the budget beyond sinks and "
                                      "window is ranked over all layers)", low=0.0, high=1.0)
    surprise_weight: float = setting(0.3, "weight of each token's surprisal (capped at 1 from 10 nats) added to its scores", low=0.0)
    fact_weight: float = setting(100.0, "after the layer budgets are split, every layer ranks by its own percentile plus this "
                                        "times the token's mean percentile over the model's fact heads (calibrated once per "
                                        "model on planted codes); 0: off", low=0.0)
    fact_heads: int = setting(12, "how many (layer, KV head) pairs the fact-head calibration chooses", low=1)
    fact_layers: int | None = setting(None, "choose the fact heads among the first N layers only", kind=int, low=1,
                                      none="any layer")
    repeat_depth: str = setting("facts", "with fact heads: the reconstruction repeat stops after the deepest fact head's layer "
                                         "('facts'; deeper layers keep the last queries' scores and an even budget) or runs "
                                         "through 'all' layers", choices=("facts", "all"))
    score_layers: str = setting("all", "with fact heads: the layers that take scores from the repeat: 'all' it runs through, "
                                       "or only those holding a fact head ('facts')", choices=("all", "facts"))
    layer_budgets: str = setting("scores", "with fact heads: split the budget over layers by this context's 'scores', or by "
                                           "each layer's score distribution measured once in the calibration ('calibrated': "
                                           "only the fact heads' layers are scored, no surprisal)", choices=("scores", "calibrated"))

    def __post_init__(self) -> None:
        check_settings(self)
        if self.layer_budgets == "calibrated" and not self.fact_weight:
            raise ChelseaError("layer_budgets='calibrated' comes from the fact-head calibration: it needs fact_weight > 0")

    @property
    def reconstructs(self) -> bool:
        """Whether the scores come from context reconstruction."""
        return self.importance in ("local", "full")
