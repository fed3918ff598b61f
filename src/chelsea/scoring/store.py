"""Where per-model calibrations live between processes: the model cache folder, by a digest.

A calibration (the fact heads, the learned scorer) is stored under
``$CHELSEA_CACHE_DIR/<kind>/<digest>.<suffix>``, the digest taken over the model's name, every
parameter's sum and the calibration's settings and version, so other weights or settings never
reuse it. Under tensor parallelism nothing is stored: each rank calibrates its own heads.

A built-in model's weights are pinned by the package that ships them, so a calibration made once
can ship with chelsea too (``scoring/shipped/<model>-<settings digest>.<suffix>``, made by
``chelsea calibrate --model NAME --ship``): the built-in default's first run then does not wait
for it. Its digest covers the settings only, since the model is known by name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..models import cache_dir

SHIPPED = Path(__file__).parent / "shipped"


def _distributed() -> bool:
    """Under tensor parallelism each rank calibrates its own heads, and nothing is stored or shipped."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def weights_digest(model) -> str:
    """A digest of ``model``'s name and weights (every parameter's sum)."""
    with torch.no_grad():
        sums = torch.stack([p.sum(dtype=torch.float32) for p in model.parameters()]).cpu().tolist()
    name = getattr(getattr(model, "config", None), "_name_or_path", "")
    return hashlib.sha1(repr((name, [f"{x:.6e}" for x in sums])).encode()).hexdigest()


def stored_path(model, kind: str, key, suffix: str = "json") -> Path | None:
    """The file of calibration ``kind`` for ``model`` and settings ``key`` (``None`` under tensor
    parallelism)."""
    if _distributed():
        return None
    digest = hashlib.sha1(repr((weights_digest(model), key)).encode()).hexdigest()
    return cache_dir() / kind / f"{digest}.{suffix}"


def shipped_path(model, kind: str, key, suffix: str = "json") -> Path | None:
    """Where calibration ``kind`` for settings ``key`` ships with the package for ``model``, if it
    is a built-in model loaded by :func:`chelsea.models.load_model` (``None`` otherwise)."""
    name = model.__dict__.get("_chelsea_builtin")
    if name is None or _distributed():
        return None
    return SHIPPED / f"{name}-{kind}-{hashlib.sha1(repr(key).encode()).hexdigest()[:16]}.{suffix}"
