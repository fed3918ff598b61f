"""The method interface and its registry.

A compression method is a frozen dataclass: its fields are its own settings (made with
:func:`chelsea.settings.setting`, so each has one description and one check), its class
attributes say what it needs from the cache, and :meth:`Method.compress` is a plain tensor
function over one layer. Adding a method is one file with one such class and ``@register`` on it;
the cache, the CLI, the evaluation, the benchmarks and the server then know it by its name.

What a method can ask of the cache (class attributes):

- ``scores``: ``None``; ``"attention"`` (the cache keeps the attention each entry has received,
  H2O and SnapKV); or ``"importance"`` (a score per entry from :mod:`chelsea.scoring`: context
  reconstruction, the last queries, or a learned scorer). The scores are passed to ``compress``
  as ``scores=`` and the kept entries' scores come back as a fourth tensor.
- ``observation_window``: with ``scores="attention"``, how many of a prompt's last queries count
  (``None``: all of them).
- ``local_decode``: while decoding, only the last ``decode_span`` entries before the window are
  compressed again (the method then has a ``decode_span`` setting).
- ``rowwise_remove``: ``compress`` takes one number to remove per batch row, so layers of
  different budgets compress as one batch.
- ``layer``: the cache layer type, ``"clustered"`` (keys, values, log-counts) or another registered
  in :data:`chelsea.cache.LAYER_TYPES` (``"clustergen"``).
- ``takes_ratio``: whether the shared ``ratio`` sets the method's memory (ClusterGen's follows
  from its own settings).

A method whose :attr:`Method.references` is above 0 (``chelsea`` with ``fit=True``) also gets
the last queries of the forward before a compression, as ``references=``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ChelseaError
from ..settings import check_settings, describe, replace_settings

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Method:
    """Base class of the compression methods; a subclass's dataclass fields are its settings."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    scores: ClassVar[str | None] = None
    observation_window: ClassVar[int | None] = None
    local_decode: ClassVar[bool] = False
    rowwise_remove: ClassVar[bool] = False
    layer: ClassVar[str] = "clustered"
    takes_ratio: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_settings(self)

    def compress(self, keys: torch.Tensor, values: torch.Tensor, log_counts: torch.Tensor, n_remove: int | list[int], *,
                 sink_tokens: int, window: int, scores: torch.Tensor | None = None) -> Tensors:
        """Remove ``n_remove`` entries per (row, KV head) of one layer between the first
        ``sink_tokens`` and the last ``window`` entries; returns ``(keys, values, log_counts)``
        (and the kept entries' ``scores`` when given) over ``[batch, kv_heads, seq, ...]``."""
        raise NotImplementedError(f"{type(self).__name__} compresses in its own cache layer")

    @property
    def compress_every(self) -> int:
        """Decoded tokens between compressions when the shared config does not say."""
        return 32

    @property
    def references(self) -> int:
        """How many of a prompt's last queries (per query head) ``compress`` wants as
        ``references=`` (:class:`chelsea.methods.fitted_merge.ReferenceQueries`), 0 for none."""
        return 0

    @property
    def span(self) -> int | None:
        """Entries before the window a decoding-time compression works on (``None``: all)."""
        return getattr(self, "decode_span", None) if self.local_decode else None

    def replace(self, **settings) -> Method:
        """A copy with ``settings`` changed (names of nested settings, such as the importance
        scoring's, are found where they live)."""
        return replace_settings(self, **settings) if settings else self

    @classmethod
    def settings(cls) -> list[tuple[str, object, str]]:
        """``(name, default, help)`` of every setting of the method."""
        return describe(cls)

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype similarities and centroids are computed in: float64 for float64 input, else float32
    (so bf16 caches do not lose precision by repeated averaging)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def region_bounds(length: int, sink_tokens: int, window: int) -> tuple[int, int]:
    """``(start, end)`` of the entries a method may remove or merge: those between the protected
    sinks and the recent window of a sequence of ``length`` entries."""
    start = min(sink_tokens, length)
    return start, max(start, length - window)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` known by its ``name`` everywhere (cache, CLI, eval, server)."""
    if not (isinstance(cls, type) and issubclass(cls, Method) and dataclasses.is_dataclass(cls)):
        raise TypeError("register takes a dataclass subclass of chelsea.methods.Method")
    if not cls.name or cls.name == "full":
        raise ValueError(f"{cls.__name__} needs a name other than '' and 'full' (the uncompressed cache)")
    METHODS[cls.name] = cls
    return cls


def method_names(*, takes_ratio: bool | None = None) -> tuple[str, ...]:
    """The registered methods' names, in registration order (optionally only those that do or do
    not take the shared ratio)."""
    return tuple(n for n, c in METHODS.items() if takes_ratio is None or c.takes_ratio == takes_ratio)


def get_method(method: str | Method | None = None, **settings) -> Method:
    """The method called ``method`` (default ``"chelsea"``) with ``settings``, or ``method`` itself
    (a :class:`Method` instance) with them changed."""
    if isinstance(method, Method):
        return method.replace(**settings)
    name = method or "chelsea"
    if name not in METHODS:
        raise ChelseaError(f"method must be one of {', '.join(('full', *METHODS))}; got {name!r}")
    cls = METHODS[name]
    return cls().replace(**settings)


def configure(name: str, settings: dict) -> Method:
    """The method ``name`` with those of ``settings`` (names to values) that it has; the rest are
    left to other methods (see :func:`check_settings_known`). A name qualified by a method,
    ``chelsea.importance``, goes to that method only, and wins over the plain name."""
    if name not in METHODS:
        raise ChelseaError(f"method must be one of {', '.join(('full', *METHODS))}; got {name!r}")
    known = {n for n, _, _ in METHODS[name].settings()}
    plain = {k: v for k, v in settings.items() if "." not in k and k in known}
    own = {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith(f"{name}.")}
    unknown = sorted(set(own) - known)
    if unknown:
        raise ChelseaError(f"{', '.join(f'{name}.{k}' for k in unknown)} is not a setting of {name} "
                           f"(`chelsea methods {name}` lists its settings)")
    return get_method(name, **{**plain, **own})


def check_settings_known(names, settings: dict) -> None:
    """Raise when a setting in ``settings`` belongs to none of the methods ``names`` (or, qualified
    as ``method.setting``, names a method not among them or a setting it lacks)."""
    known = {n for name in names if name in METHODS for n, _, _ in METHODS[name].settings()}
    unknown = sorted(k for k in settings if "." not in k and k not in known)
    if unknown:
        raise ChelseaError(f"{', '.join(unknown)} is not a setting of {', '.join(names) or 'these methods'} "
                           "(`chelsea methods` lists each method's settings)")
    for key in settings:
        if "." in key:
            method, name = key.split(".", 1)
            if method not in names:
                raise ChelseaError(f"{key}: {method!r} is not among the methods run here ({', '.join(names) or 'none'})")
            configure(method, {key: settings[key]})
