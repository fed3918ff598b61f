"""``chelsea eval``: accuracy of every method at every budget, on generated long-context tasks.

The grid is tasks x placements x lengths x methods x ratios x samples. ``full`` runs once per
(task, placement, length) at ratio 0; ``clustergen`` runs once at its own settings (ratio
``None``; its memory is in ``kv_fraction``). Samples of one cell have the same length, so they run
as one batch without padding.

Every finished sample is appended to ``results.jsonl`` in the output folder as soon as its batch
ends; a rerun with the same folder skips what is there, so an interrupted run picks up where it
stopped. Question tasks score the fraction of expected answers found in the greedy reply;
``ppl`` reads haystack text in blocks of ``ppl_block`` tokens, the cache compressing after each
block as it would while reading a long document, and records the negative log-likelihood of
every token after the first.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from .config import ClusterGenConfig, CompressionConfig
from .compat import cache_arg
from .errors import ChelseaError
from .generation import METHODS, _sync, cache_stats, make_cache, use_method
from .importance import compress_context
from .support import check_prompt_length
from .tasks import PLACEMENTS, QUESTION_TASKS, TASKS, Sample, TaskBuilder, score

RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Cell:
    """One group of samples that share a prompt length and a cache setting."""

    task: str
    placement: str
    length: int
    method: str
    ratio: float | None


def plan(tasks: Iterable[str], methods: Iterable[str], ratios: Iterable[float], lengths: Iterable[int],
         placements: Iterable[str]) -> list[Cell]:
    """Every cell of the grid, checked: unknown names and bad ratios fail before any model runs."""
    tasks, methods, ratios, lengths, placements = map(list, (tasks, methods, ratios, lengths, placements))
    for t in tasks:
        if t not in TASKS:
            raise ChelseaError(f"--tasks: {t!r} is not one of {', '.join(TASKS)}")
    for m in methods:
        if m not in METHODS:
            raise ChelseaError(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    for p in placements:
        if p not in PLACEMENTS:
            raise ChelseaError(f"--placements: {p!r} is not one of {', '.join(PLACEMENTS)}")
    for r in ratios:
        CompressionConfig(ratio=r)
    for n in lengths:
        if n < 256:
            raise ChelseaError(f"--lengths: each length must be at least 256 tokens; got {n}")
    settings = []
    for m in methods:
        settings += [(m, 0.0)] if m == "full" else [(m, None)] if m == "clustergen" else [(m, r) for r in ratios]
    cells = []
    for n in lengths:
        for t in tasks:
            for p in (placements if t in QUESTION_TASKS else ["-"]):
                cells += [Cell(t, p, n, m, r) for m, r in settings]
    return cells


def _key(row: dict) -> tuple:
    return (row["task"], row["placement"], row["length"], row["method"], row["ratio"], row["index"])


def load_rows(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _config(cell: Cell, knobs: dict, clustergen: ClusterGenConfig | None):
    """The cell's compression settings (``None`` for the full cache)."""
    if cell.method == "clustergen":
        return clustergen or ClusterGenConfig(sink_tokens=knobs.get("sink_tokens", 4), window=knobs.get("window", 64))
    if cell.method == "full":
        return None
    return CompressionConfig(ratio=cell.ratio, **knobs)


def _prepare(model, samples: list[Sample], cell: Cell, config):
    """The batch's token ids and a fresh cache for the cell; the model switched to its attention."""
    ids = torch.tensor([s.input_ids for s in samples], device=model.device)
    use_method(model, cell.method)
    return ids, make_cache(cell.method, config)


def _answer(model, tokenizer, samples: list[Sample], cell: Cell, config) -> list[dict]:
    """Greedy replies of one batch of equal-length prompts with the cell's cache.

    ``agnostic`` samples (and every sample of an importance-ranked method) are prefilled and
    compressed up to their context's end first (:func:`chelsea.importance.compress_context`);
    ``generate`` then reads the rest of the prompt into the compressed cache and answers.
    """
    ids, cache = _prepare(model, samples, cell, config)
    new_tokens = max(s.max_new_tokens for s in samples)
    split = samples[0].context_end
    question = split is None and cell.placement == "after"  # the compressed prompt ends with the question
    if split is None and getattr(cache, "scores_importance", False):
        split = ids.shape[1] - 1
    with torch.inference_mode():
        if split is not None and cell.method != "full":
            compress_context(model, cache, ids[:, :split], tokenizer, question=question)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **cache_arg(model, cache), max_new_tokens=new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
        )
    stats = cache_stats(cache)
    rows = []
    for s, row in zip(samples, out[:, ids.shape[1] :]):
        reply = tokenizer.decode(row, skip_special_tokens=True).strip()
        rows.append({"score": score(reply, s.answers), "answers": s.answers, "reply": reply, "depth": s.depth, **_memory(stats)})
    return rows


def _perplexity(model, samples: list[Sample], cell: Cell, config, block: int) -> list[dict]:
    """Negative log-likelihood of each sample read ``block`` tokens at a time through the cell's cache."""
    ids, cache = _prepare(model, samples, cell, config)
    nll = torch.zeros(len(samples), dtype=torch.float64, device=model.device)
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, block):
            chunk = ids[:, start : start + block]
            logits = model(input_ids=chunk, **cache_arg(model, cache), use_cache=True).logits
            targets = ids[:, start + 1 : start + 1 + chunk.shape[1]]
            logits = logits[:, : targets.shape[1]].float()
            nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(-1).double()
    stats = cache_stats(cache)
    tokens = ids.shape[1] - 1
    return [{"nll_sum": float(v), "tokens": tokens, "ppl": float(torch.exp(v / tokens)), **_memory(stats)} for v in nll]


def _memory(stats: dict) -> dict:
    full = stats["kv_bytes_full"]
    return {"kv_bytes": stats["kv_bytes"], "kv_bytes_full": full, "kv_fraction": round(stats["kv_bytes"] / full, 4) if full else None}


def run_eval(
    model,
    tokenizer,
    out_dir: Path,
    *,
    model_name: str,
    tasks: list[str],
    methods: list[str],
    ratios: list[float],
    lengths: list[int],
    placements: list[str] = list(PLACEMENTS),
    samples: int = 20,
    batch_size: int = 8,
    seed: int = 0,
    ppl_block: int = 256,
    haystack: Path | None = None,
    chat_template: bool = True,
    knobs: dict | None = None,
    clustergen: ClusterGenConfig | None = None,
    progress: bool = True,
) -> dict:
    """Run every unfinished sample of the grid, appending to ``out_dir/results.jsonl``.

    Returns ``{"ran": n, "skipped": m}``. ``knobs`` are the compression settings other than the
    ratio (``chunk_size``, ``sink_tokens``, ``window``, ``step_fraction``); ``clustergen`` the
    settings of that method (default: its defaults with the same sinks and window). Rows do not
    carry these settings, so a folder made with other settings is refused rather than mixed.
    """
    if samples < 1 or batch_size < 1 or ppl_block < 16:
        raise ChelseaError("--samples and --batch-size must be at least 1 and --ppl-block at least 16")
    knobs = dict(knobs or {})
    CompressionConfig(**knobs)
    settings = {"knobs": knobs, "clustergen": clustergen.to_dict() if clustergen is not None else None}
    _check_same_settings(Path(out_dir), settings)
    cells = plan(tasks, methods, ratios, lengths, placements)
    for n in lengths:
        check_prompt_length(model.config, n, 64)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in load_rows(out_dir) if r.get("model") == model_name}
    todo = [(c, i) for c in cells for i in range(samples) if (c.task, c.placement, c.length, c.method, c.ratio, i) not in done]
    _log_run(out_dir, model_name, model, locals_=dict(tasks=tasks, methods=methods, ratios=ratios, lengths=lengths,
             placements=placements, samples=samples, batch_size=batch_size, seed=seed, ppl_block=ppl_block,
             chat_template=chat_template, **settings))
    if not todo:
        return {"ran": 0, "skipped": len(cells) * samples}
    builder = TaskBuilder(tokenizer, haystack=haystack, chat_template=chat_template, seed=seed)
    bar = tqdm(total=len(todo), desc="eval", unit="sample", disable=not progress)
    prompts: dict[tuple, Sample] = {}
    pending: dict[Cell, list[int]] = {}
    for cell, i in todo:
        pending.setdefault(cell, []).append(i)
    with open(out_dir / RESULTS, "a", encoding="utf-8") as sink:
        for cell, indices in pending.items():
            bar.set_postfix_str(f"{cell.task}/{cell.placement} {cell.length} {cell.method} {cell.ratio}")
            config = _config(cell, knobs, clustergen)
            for first in range(0, len(indices), batch_size):
                batch = indices[first : first + batch_size]
                items = []
                for i in batch:
                    key = (cell.task, cell.placement, cell.length, i)
                    if key not in prompts:
                        prompts[key] = (builder.ppl_sample(cell.length, i) if cell.task == "ppl"
                                        else builder.sample(cell.task, cell.length, cell.placement, i))
                    items.append(prompts[key])
                _sync(model.device)
                start = time.perf_counter()
                if cell.task == "ppl":
                    results = _perplexity(model, items, cell, config, ppl_block)
                else:
                    results = _answer(model, tokenizer, items, cell, config)
                _sync(model.device)
                seconds = (time.perf_counter() - start) / len(items)
                for i, result in zip(batch, results):
                    row = {"model": model_name, "task": cell.task, "placement": cell.placement, "length": cell.length,
                           "method": cell.method, "ratio": cell.ratio, "index": i, **result, "seconds": round(seconds, 3)}
                    sink.write(json.dumps(row) + "\n")
                sink.flush()
                bar.update(len(batch))
    bar.close()
    return {"ran": len(todo), "skipped": len(cells) * samples - len(todo)}


def _check_same_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to add rows to a folder whose last run used other compression settings."""
    path = out_dir / "runs.json"
    if not path.is_file():
        return
    runs = json.loads(path.read_text())
    for name, value in settings.items():
        if name == "clustergen":  # compare with the last run that had clustergen in it
            if value is None:
                continue
            before = next((r[name] for r in reversed(runs) if r.get(name) is not None), value)
        else:
            before = runs[-1].get(name, value)
        if before != value:
            raise ChelseaError(f"{out_dir} holds results made with other {name} settings ({before} instead of {value}); "
                               "use a new --out folder, or the same settings to resume")


def _log_run(out_dir: Path, model_name: str, model, locals_: dict) -> None:
    """Append this invocation's settings and machine to ``runs.json`` (what produced the results)."""
    path = out_dir / "runs.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    device = model.device
    runs.append({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **locals_,
    })
    path.write_text(json.dumps(runs, indent=1))
