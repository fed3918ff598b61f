"""``chelsea eval``: accuracy of every method at every budget, on generated long-context tasks.

The grid is tasks x placements x lengths x methods x ratios x samples. ``full`` runs once per
(task, placement, length) at ratio 0; a method that does not take the ratio (``clustergen``) runs
once at its own settings (ratio ``None``; its memory is in ``kv_fraction``). ``settings`` (names to
values) go to every method that has them; the shared ones (sinks, window) to all. Samples of one
cell have the same length, so they run as one batch without padding.

Every finished sample is appended to ``results.jsonl`` in the output folder as soon as its batch
ends; a rerun with the same folder skips what is there, so an interrupted run picks up where it
stopped. Question tasks score the fraction of expected answers found in the greedy reply;
``ppl`` reads haystack text in blocks of ``ppl_block`` tokens, the cache compressing after each
block as it would while reading a long document, and records the negative log-likelihood of
every token after the first.
"""

from __future__ import annotations

import dataclasses
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

from ..compat import cache_arg
from ..errors import ChelseaError
from ..methods import METHODS, check_settings_known, configure
from ..models import check_prompt_length
from ..runtime import cache_stats, make_cache, method_choices, sync, use_method
from ..scoring import compress_context, prepare_scoring
from ..settings import CompressionConfig
from .tasks import PLACEMENTS, QUESTION_TASKS, REAL_TASKS, STREAM_CHUNK, TASKS, Sample, TaskBuilder, score

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
        if m not in method_choices():
            raise ChelseaError(f"--methods: {m!r} is not one of {', '.join(method_choices())}")
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
        settings += [(m, 0.0)] if m == "full" else [(m, r) for r in ratios] if METHODS[m].takes_ratio else [(m, None)]
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


SHARED = frozenset(CompressionConfig.__dataclass_fields__) - {"ratio"}


def _cache(model, cell: Cell, settings: dict, context: int | None = None):
    """A fresh cache for the cell, the model switched to its attention.

    A ``streamed`` cell's cache gets a fixed capacity, the ratio's share of the whole ``context``
    (unless ``--capacity`` sets another): as a chat server with a memory budget would, it fills up
    to the budget before it compresses, so early chunks are not cut to a share of the few tokens
    seen so far; at the end it holds as many entries as the other placements, and never more
    than that budget plus one chunk.
    """
    use_method(model, cell.method)
    if cell.method == "full":
        return make_cache("full")
    shared = {k: v for k, v in settings.items() if k in SHARED}
    own = {k: v for k, v in settings.items() if k not in SHARED}
    config = CompressionConfig(ratio=cell.ratio or 0.0, **shared)
    if cell.placement == "streamed" and context is not None and config.capacity is None and config.ratio > 0:
        config = dataclasses.replace(config, capacity=config.budget(context))
    return make_cache(configure(cell.method, own), config)


def _answer(model, tokenizer, samples: list[Sample], cell: Cell, settings: dict) -> list[dict]:
    """Greedy replies of one batch of equal-length prompts with the cell's cache.

    ``agnostic`` samples (and every sample of an importance-ranked method) are prefilled and
    compressed up to their context's end first (:func:`chelsea.scoring.compress_context`);
    ``streamed`` samples read their context in chunks of :data:`STREAM_CHUNK` tokens into a cache
    of fixed capacity (:func:`_cache`), each compressed as it arrives, with no pass over the whole
    context; ``generate`` then reads the rest of the prompt into the compressed cache and answers.
    """
    split = samples[0].context_end
    ids, cache = torch.tensor([s.input_ids for s in samples], device=model.device), _cache(model, cell, settings, split)
    new_tokens = max(s.max_new_tokens for s in samples)
    question = split is None and cell.placement == "after"  # the compressed prompt ends with the question
    if split is None and cell.method != "full" and cache.method.scores == "importance":
        split = ids.shape[1] - 1
    with torch.inference_mode():
        if cell.placement == "streamed":
            prepare_scoring(model, tokenizer, cache)
            for start in range(0, split, STREAM_CHUNK):
                model(ids[:, start : min(split, start + STREAM_CHUNK)], **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
        elif split is not None and cell.method != "full":
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


def _perplexity(model, tokenizer, samples: list[Sample], cell: Cell, settings: dict, block: int) -> list[dict]:
    """Negative log-likelihood of each sample read ``block`` tokens at a time through the cell's
    cache (scored by the learned scorer as it is written, when the method uses it)."""
    ids, cache = torch.tensor([s.input_ids for s in samples], device=model.device), _cache(model, cell, settings)
    nll = torch.zeros(len(samples), dtype=torch.float64, device=model.device)
    with torch.inference_mode():
        prepare_scoring(model, tokenizer, cache)
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
    settings: dict | None = None,
    progress: bool = True,
) -> dict:
    """Run every unfinished sample of the grid, appending to ``out_dir/results.jsonl``.

    Returns ``{"ran": n, "skipped": m}``. ``settings`` (names to values) go to every method that
    has them (the shared ``sink_tokens``, ``window``, ``compress_every`` to all). Rows do not
    carry these settings, so a folder made with other settings is refused rather than mixed.
    """
    if samples < 1 or batch_size < 1 or ppl_block < 16:
        raise ChelseaError("--samples and --batch-size must be at least 1 and --ppl-block at least 16")
    settings = dict(settings or {})
    cells = plan(tasks, methods, ratios, lengths, placements)
    CompressionConfig(**{k: v for k, v in settings.items() if k in SHARED})
    check_settings_known([m for m in methods if m != "full"], {k: v for k, v in settings.items() if k not in SHARED})
    for m in {c.method for c in cells if c.method != "full"}:
        configure(m, {k: v for k, v in settings.items() if k not in SHARED})  # bad values fail before any model runs
    _check_same_settings(Path(out_dir), {"settings": settings})
    for n in lengths:
        check_prompt_length(model.config, n, 64)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in load_rows(out_dir) if r.get("model") == model_name}
    builder = TaskBuilder(tokenizer, haystack=haystack, chat_template=chat_template, seed=seed)
    kept = {t: _unknown_without_context(model, tokenizer, builder, t, samples, out_dir) if t in REAL_TASKS else list(range(samples))
            for t in {c.task for c in cells}}
    todo = [(c, i) for c in cells for i in kept[c.task] if (c.task, c.placement, c.length, c.method, c.ratio, i) not in done]
    _log_run(out_dir, model_name, model, locals_=dict(tasks=tasks, methods=methods, ratios=ratios, lengths=lengths,
             placements=placements, samples=samples, batch_size=batch_size, seed=seed, ppl_block=ppl_block,
             chat_template=chat_template, settings=settings,
             resolved={m: configure(m, {k: v for k, v in settings.items() if k not in SHARED}).to_dict()
                       for m in methods if m != "full"}))
    if not todo:
        return {"ran": 0, "skipped": len(cells) * samples}
    pending: dict[Cell, list[int]] = {}
    for cell, i in todo:
        pending.setdefault(cell, []).append(i)
    run = lambda cell, items: (_perplexity(model, tokenizer, items, cell, settings, ppl_block) if cell.task == "ppl"  # noqa: E731
                               else _answer(model, tokenizer, items, cell, settings))
    with open(out_dir / RESULTS, "a", encoding="utf-8") as sink, \
            tqdm(total=len(todo), desc="eval", unit="sample", disable=not progress) as bar:
        for cell, indices in pending.items():
            bar.set_postfix_str(f"{cell.task}/{cell.placement} {cell.length} {cell.method} {cell.ratio}")
            for first in range(0, len(indices), batch_size):
                batch = indices[first : first + batch_size]
                for row in _batch_rows(model, builder, cell, batch, run):
                    sink.write(json.dumps({"model": model_name, **row}) + "\n")
                sink.flush()
                bar.update(len(batch))
    return {"ran": len(todo), "skipped": len(cells) * samples - len(todo)}


CLOSED_BOOK = "closed_book.jsonl"


def _unknown_without_context(model, tokenizer, builder: TaskBuilder, task: str, samples: int, out_dir: Path) -> list[int]:
    """The first ``samples`` indices of ``task`` whose question the model does not answer without
    the context (asked once, greedy, with the full cache; kept in ``closed_book.jsonl``)."""
    path = out_dir / CLOSED_BOOK
    known = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["task"] == task:
                known[row["index"]] = row["known"]
    kept, index = [], 0
    with open(path, "a", encoding="utf-8") as sink:
        while len(kept) < samples and index < 20 * samples:
            if index not in known:
                sample = builder.closed_book(task, index)
                reply = _answer(model, tokenizer, [sample], Cell(task, "closed", sample.length, "full", 0.0), {})[0]
                known[index] = reply["score"] > 0
                sink.write(json.dumps({"task": task, "index": index, "known": known[index], "reply": reply["reply"],
                                       "answers": sample.answers}) + "\n")
            if not known[index]:
                kept.append(index)
            index += 1
    return kept


def _batch_rows(model, builder: TaskBuilder, cell: Cell, indices: list[int], run) -> list[dict]:
    """The result rows of samples ``indices`` of ``cell``, run together by ``run(cell, samples)``."""
    samples = [builder.ppl_sample(cell.length, i) if cell.task == "ppl" else builder.sample(cell.task, cell.length, cell.placement, i)
               for i in indices]
    sync(model.device)
    start = time.perf_counter()
    results = run(cell, samples)
    sync(model.device)
    seconds = round((time.perf_counter() - start) / len(samples), 3)
    return [{"task": cell.task, "placement": cell.placement, "length": cell.length, "method": cell.method, "ratio": cell.ratio,
             "index": i, **result, "seconds": seconds} for i, result in zip(indices, results)]


def _check_same_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to add rows to a folder whose last run used other compression settings."""
    path = out_dir / "runs.json"
    if not path.is_file():
        return
    runs = json.loads(path.read_text())
    for name, value in settings.items():
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
