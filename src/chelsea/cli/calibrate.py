"""``chelsea calibrate``: the once-per-model work of the default method, ahead of time."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from ..errors import ChelseaError
from ..models import BUILTIN_MODELS
from ..settings import CompressionConfig
from .options import DEFAULT_MODEL, DeviceOpt, DtypeOpt, ModelOpt, SetOpt, SinkOpt, WindowOpt, app, parse_settings


@app.command()
def calibrate(
    model: ModelOpt = DEFAULT_MODEL,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="A tokenizer folder: for a preset with random weights "
                                                  "(chelsea bench's llama3-8b, qwen2.5-7b, ...), to time the calibration of that size.")] = None,
    sinks: SinkOpt = 4,
    window: WindowOpt = 64,
    settings: SetOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    ship: Annotated[bool, typer.Option("--ship", help="Also write the learned scorer where the package ships it for a "
                                       "built-in model (src/chelsea/scoring/shipped/), for a maintainer to commit.")] = False,
) -> None:
    """Find the model's fact heads and fit its learned scorer now (stored in the model cache folder,
    $CHELSEA_CACHE_DIR), so that the first request or generation does not wait for them."""
    import torch

    from .. import ClusteredCache
    from ..methods import check_settings_known, configure
    from ..models import PRESETS, load_model, load_with_tokenizer
    from ..runtime import use_method
    from ..scoring import find_fact_heads, find_learned

    own = parse_settings(settings)
    check_settings_known(["chelsea"], own)
    config = CompressionConfig(sink_tokens=sinks, window=window)
    if ship and (model not in BUILTIN_MODELS or configure("chelsea", own).scoring.importance != "learned"):
        raise ChelseaError(f"--ship writes a built-in model's learned scorer ({', '.join(BUILTIN_MODELS)}); "
                           "drop --ship, or name one of them and keep importance=learned")
    if model in PRESETS or tokenizer:
        lm, words = load_with_tokenizer(model, tokenizer)
    else:
        lm, words = load_model(model, device=device, dtype=dtype)
    use_method(lm, "chelsea")
    cache = ClusteredCache(config, method=configure("chelsea", own))
    start = time.perf_counter()
    with torch.inference_mode():
        heads = find_fact_heads(lm, words, cache)
        found = time.perf_counter()
        scorer = find_learned(lm, words, cache) if cache.method.scoring.importance == "learned" else None
    done = time.perf_counter()
    report = {"model": model, "device": str(lm.device), "fact_heads": [list(h) for h in heads.heads], "fact_heads_s": round(found - start, 2),
              "learned": None if scorer is None else scorer.metrics, "learned_s": round(done - found, 2)}
    if ship:
        from ..scoring.learned import learned_key
        from ..scoring.store import shipped_path

        target = shipped_path(lm, "learned", learned_key(cache.config, cache.method), suffix="pt")
        if scorer is None or target is None:
            raise ChelseaError("--ship could not place the scorer (a tensor-parallel run stores none)")
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(scorer.to_dict(), target)
        report["shipped"] = target.name
    typer.echo(json.dumps(report))
