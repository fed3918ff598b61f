"""Serving load: many clients against the engine of ``chelsea serve``, full cache vs compressed,
within one KV memory limit.

Scenarios (each client asks its questions one after another, greedy, ``--max-tokens`` tokens per
answer, end-of-sequence ignored so every answer has the same length):

- ``shared``: one document of ``--context`` tokens is registered (prefilled and compressed once);
  every question names it, so each request starts from a copy of its compressed cache.
- ``distinct``: every request brings its own document, prefilled and compressed on arrival.

After a rehearsal of every path (the shared load once, not measured: every batch size the load
reaches has run), one client alone measures the time to first token of a question whose prompt
holds the whole document (prefill + compression) against one on the registered document.

The engine is driven in-process (the HTTP layer of ``chelsea serve`` adds the same small cost to
every method and is left out). Both methods get the same ``--kv-budget-gib`` for the running
sequences' caches, and ``--max-batch`` sequences at most; ``--cuda-graph`` replays every
method's decoding steps from CUDA graphs (the full cache's too). A preset name (``qwen2.5-0.5b``,
``llama3-8b``, ...) loads the architecture with random weights: right for speed and memory, never
for accuracy; ``--tokenizer`` then names a tokenizer folder with a chat template (the
reconstruction prompt of ``chelsea`` needs one).

    python benchmarks/serve_load.py --model qwen2.5-0.5b --tokenizer TOKENIZER_DIR --context 32000 \
        --clients 32 --kv-budget-gib 4 --methods full,chelsea-paper,chelsea --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import threading
import time

import torch

from chelsea.cli.options import parse_settings
from chelsea.haystack import find_haystack, haystack_text
from chelsea.models import load_with_tokenizer
from chelsea.serving import Engine, Job


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def _collect(job: Job) -> tuple[float | None, int]:
    """Wait for ``job``'s tokens; returns (time of its first token, tokens)."""
    first, count = None, 0
    while True:
        item = job.tokens.get()
        if item is None:
            return first, count
        if isinstance(item, Exception):
            raise item
        if first is None:
            first = time.perf_counter()
        count += 1


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def documents(tokenizer, engine: Engine, count: int, tokens: int) -> list[list[int]]:
    """``count`` different documents of exactly ``tokens`` ids (stretches of the haystack essays)."""
    text = haystack_text(find_haystack(None))
    ids = engine.document_ids(text)
    head = len(engine.document_ids(""))
    body = ids[head:]
    out = []
    for i in range(count):
        start = (i * 997) % max(1, len(body) - tokens)
        piece = (body * (1 + tokens // len(body) + 1))[start : start + tokens - head]
        out.append(ids[:head] + piece)
    return out


def run_load(engine: Engine, method: str, ratio: float, requests: list[list[int]], clients: int, max_tokens: int,
             document: str | None) -> dict:
    """``clients`` threads share ``requests`` (prompt ids, in order); returns the measurements."""
    lock, queue_of, records = threading.Lock(), list(range(len(requests))), []

    def client():
        while True:
            with lock:
                if not queue_of:
                    return
                i = queue_of.pop(0)
            job = Job(requests[i], method, ratio, max_tokens, document=document, ignore_eos=True)
            engine.submit(job)
            first, count = _collect(job)
            end = time.perf_counter()
            with lock:
                records.append({"ttft": first - job.submitted, "latency": end - job.submitted, "tokens": count})

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    engine.decoder.peak_running = engine.decoder.peak_kv_bytes = 0
    steps = engine.counters["decode_steps_total"]
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in records]
    tokens = sum(r["tokens"] for r in records)
    return {
        "requests": len(records), "wall_s": round(wall, 2), "requests_per_s": round(len(records) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p90_s": round(_percentile(ttft, 0.9), 3), "latency_p50_s": round(statistics.median(r["latency"] for r in records), 3),
        "decode_steps": engine.counters["decode_steps_total"] - steps, "peak_batch": engine.peak_running,
        "peak_running_kv_gib": round(engine.peak_kv_bytes / 2**30, 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }


def first_vs_second(engine: Engine, method: str, ratio: float, doc: list[int], question: list[int], max_tokens: int) -> dict:
    """Time to first token of a question with the document inline, then registered, then asked again."""
    job = engine.submit(Job(doc + question, method, ratio, max_tokens, ignore_eos=True))
    first, _ = _collect(job)
    inline = first - job.submitted
    start = time.perf_counter()
    name = engine.register_ids(doc, method, ratio)
    register = time.perf_counter() - start
    job = engine.submit(Job(doc + question, method, ratio, max_tokens, document=name, ignore_eos=True))
    first, _ = _collect(job)
    second = first - job.submitted
    return {"ttft_inline_s": round(inline, 4), "register_s": round(register, 4), "ttft_registered_s": round(second, 4),
            "second_over_first": round(second / inline, 4), "document": name,
            "document_kv_mib": round(engine.documents[name].nbytes / 2**20, 1)}


def measure_method(engine: Engine, method: str, args, docs: list[list[int]], questions: list[list[int]], *, rehearse: bool,
                   run: int) -> list[dict]:
    """One method's scenarios (after one rehearsal of every path, not measured, when ``rehearse``)."""
    ratio = 0.0 if method == "full" else args.ratio
    if rehearse:
        engine.prepare(method)  # a calibration or a scorer's fit happens once, outside the measurement
        rehearsal = first_vs_second(engine, method, ratio, docs[0], questions[0], args.max_tokens)
        # the whole load once: every batch size it reaches runs (and compiles its kernels) before the measurement
        run_load(engine, method, ratio, [docs[0] + q for q in questions[: args.clients]], args.clients, args.max_tokens,
                 rehearsal["document"])
        engine.documents.clear()
    once = first_vs_second(engine, method, ratio, docs[0], questions[0], args.max_tokens)
    print(f"{method}: first question {once['ttft_inline_s']:.3f} s to first token, registered {once['ttft_registered_s']:.3f} s "
          f"({once['second_over_first']:.1%}); document {once['document_kv_mib']} MiB", flush=True)
    rows = []
    for scenario in args.scenarios.split(","):
        if scenario == "shared":
            prompts = [docs[0] + q for q in questions]
            result = run_load(engine, method, ratio, prompts, args.clients, args.max_tokens, once["document"])
        else:
            prompts = [d + questions[i] for i, d in enumerate(docs[: args.distinct_requests])]
            result = run_load(engine, method, ratio, prompts, args.clients, args.max_tokens, None)
        row = {"run": run, "method": method, "ratio": ratio, "scenario": scenario, "context": args.context, "clients": args.clients,
               "max_tokens": args.max_tokens, "kv_budget_gib": args.kv_budget_gib, "max_batch": args.max_batch, "cuda_graph": args.cuda_graph,
               "settings": engine.method_settings, **result}
        if scenario == "shared":
            row.update({k: once[k] for k in ("ttft_inline_s", "register_s", "ttft_registered_s", "second_over_first", "document_kv_mib")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    engine.documents.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b", help="built-in model, path, or a preset with random weights")
    parser.add_argument("--tokenizer", help="tokenizer folder (needed with a preset)")
    parser.add_argument("--context", type=int, default=32000, help="document tokens")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--questions", type=int, default=2, help="questions per client (shared scenario)")
    parser.add_argument("--distinct-requests", type=int, default=16, help="requests in the distinct scenario")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-budget-gib", type=float, default=4.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--cuda-graph", action="store_true", help="replay each batch's decoding step from a CUDA graph")
    parser.add_argument("--methods", default="full,chelsea-paper,chelsea")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--scenarios", default="shared,distinct")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a method setting for the server, as chelsea serve --set (repeatable)")
    parser.add_argument("--repeats", type=int, default=1, help="measure every method's scenarios this many times (all runs kept)")
    parser.add_argument("--out")
    args = parser.parse_args()

    model, tokenizer = load_with_tokenizer(args.model, args.tokenizer)
    engine = Engine(model, tokenizer, method="full", ratio=0.0, cuda_graph=args.cuda_graph, max_queue=max(args.clients, args.distinct_requests) + 4,
                    reuse_bytes=64 << 30, max_tokens_limit=args.max_tokens, max_batch=args.max_batch,
                    kv_budget=int(args.kv_budget_gib * 2**30), settings=parse_settings(args.set))
    docs = documents(tokenizer, engine, max(1, args.distinct_requests), args.context)
    questions = [engine.question_ids(f"Question {i}: what does the essay say about its main topic?") for i in range(args.clients * args.questions)]
    rows = []
    for run in range(args.repeats):
        for method in args.methods.split(","):
            rows += measure_method(engine, method, args, docs, questions, rehearse=run == 0, run=run)
            save(args, rows)  # what is measured so far survives a run cut short
    print_table(rows)
    engine.close()


def save(args, rows: list[dict]) -> None:
    """Each row against the full cache's of the same run and scenario; written to ``--out``."""
    for r in rows:
        full = next((f for f in rows if f["method"] == "full" and f["scenario"] == r["scenario"] and f["run"] == r["run"]), None)
        if full:
            r["requests_per_s_vs_full"] = round(r["requests_per_s"] / full["requests_per_s"], 2)
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        meta = {"date": datetime.date.today().isoformat(), "device": device, "model": args.model, "torch": torch.__version__,
                "command": "python benchmarks/serve_load.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                          if v not in (None, []) and k != "out")}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def print_table(rows: list[dict]) -> None:
    columns = ["run", "method", "scenario", "requests", "requests_per_s", "requests_per_s_vs_full", "tokens_per_s", "ttft_p50_s",
               "ttft_p90_s", "peak_batch", "peak_running_kv_gib", "peak_gpu_gib"]
    widths = [max(len(c), *(len(str(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


if __name__ == "__main__":
    main()
