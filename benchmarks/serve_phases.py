"""Where a serving run's time goes: ``serve_load.py``'s shared scenario with its engine's phases timed.

Each phase (the decoding step's forward, the learned scorer inside it, the compression after it,
rows joining and leaving (their caches' copies); the prefill worker's copy of the document's cache, its forward, the
hand-over) is timed on its own thread, its CUDA stream synchronised before and after, so a
phase's time is what it costs that thread, kernels included. The synchronisation itself costs
a little: requests per second here are lower than in ``serve_load.py``, compare methods with
each other, not with its tables. With ``--host-time`` nothing is synchronised: a phase's time is
what the host spends issuing its work (and any wait the code makes itself), so comparing the two
runs says which phases keep the GPU waiting. Prints one table per method and writes JSON.

    python benchmarks/serve_phases.py --model qwen2.5-7b --tokenizer TOKENIZER_DIR --context 32000 \
        --clients 64 --kv-budget-gib 16 --methods chelsea-paper,chelsea --out phases.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import threading
import time
from collections import defaultdict

import torch

import serve_load
from chelsea.cache import ClusteredCache
from chelsea.cli.options import parse_settings
from chelsea.models import load_with_tokenizer
from chelsea.scoring.learned import LearnedScorer
from chelsea.serving import Engine
from chelsea.serving.decoder import Decoder
from chelsea.serving.prefill import PrefillWorker

_totals: dict = defaultdict(lambda: [0.0, 0])
_local = threading.local()
_synced = [True]  # whether phases synchronise the stream (--host-time turns it off)


def _sync() -> None:
    if _synced[0] and torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


def _thread() -> str:
    return "decode" if threading.current_thread().name == "chelsea-decode" else "prefill"


@contextlib.contextmanager
def phase(name: str):
    """Time ``name`` on this thread (nested phases count inside their parent too)."""
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        total = _totals[(_thread(), name)]
        total[0] += time.perf_counter() - start
        total[1] += 1


def _wrap(owner, attr: str, name: str) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        with phase(name):
            return original(*args, **kwargs)

    setattr(owner, attr, timed)


def instrument(engine: Engine) -> None:
    """Time the engine's phases (on both workers' threads)."""
    _wrap(Decoder, "_step", "step")
    _wrap(ClusteredCache, "append_rows", "append_rows")
    _wrap(ClusteredCache, "compress_due", "compress_due")
    _wrap(ClusteredCache, "keep_rows", "keep_rows")
    _wrap(LearnedScorer, "score_new", "score_new")
    _wrap(PrefillWorker, "_start_on_document", "start_on_document")
    _wrap(PrefillWorker, "_hand_over", "hand_over")
    _wrap(PrefillWorker, "_prefill", "prefill")
    model = engine.model
    forward = model.forward

    def timed_forward(*args, **kwargs):
        with phase("forward"):
            return forward(*args, **kwargs)

    model.forward = timed_forward
    deepcopy = copy.deepcopy

    def timed_deepcopy(x, *args, **kwargs):
        if not isinstance(x, ClusteredCache):
            return deepcopy(x, *args, **kwargs)
        with phase("copy_document"):
            return deepcopy(x, *args, **kwargs)

    import chelsea.serving.prefill as prefill_module
    prefill_module.copy = type("copy", (), {"deepcopy": staticmethod(timed_deepcopy)})


def _timed_load() -> None:
    """Count only what the load itself runs (not the single-client measurements around it)."""
    run_load = serve_load.run_load

    @functools.wraps(run_load)
    def timed(*args, **kwargs):
        _totals.clear()
        result = run_load(*args, **kwargs)
        _load_totals.clear()
        _load_totals.update(_totals)
        return result

    serve_load.run_load = timed


_load_totals: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--tokenizer")
    parser.add_argument("--context", type=int, default=32000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-budget-gib", type=float, default=16.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--methods", default="chelsea-paper,chelsea")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--host-time", action="store_true", help="do not synchronise around phases: time what the host spends")
    parser.add_argument("--out")
    args = parser.parse_args()
    _synced[0] = not args.host_time
    args.questions, args.distinct_requests, args.scenarios = 1, 1, "shared"

    model, tokenizer = load_with_tokenizer(args.model, args.tokenizer)
    engine = Engine(model, tokenizer, method="full", ratio=0.0, max_queue=args.clients + 4, reuse_bytes=64 << 30,
                    max_tokens_limit=args.max_tokens, max_batch=args.max_batch, kv_budget=int(args.kv_budget_gib * 2**30),
                    settings=parse_settings(args.set))
    instrument(engine)
    _timed_load()
    docs = serve_load.documents(tokenizer, engine, 1, args.context)
    questions = [engine.question_ids(f"Question {i}: what does the essay say about its main topic?") for i in range(args.clients)]
    results = []
    for method in args.methods.split(","):
        serve_load.measure_method(engine, method, args, docs, questions, rehearse=True, run=0)  # warm-up, not counted
        row = serve_load.measure_method(engine, method, args, docs, questions, rehearse=False, run=1)[0]
        phases = {f"{thread}/{name}": {"s": round(t, 3), "calls": n, "ms_per_call": round(1000 * t / max(1, n), 2)}
                  for (thread, name), (t, n) in sorted(_load_totals.items())}
        results.append({"method": method, "requests_per_s": row["requests_per_s"], "wall_s": row["wall_s"],
                        "decode_steps": row["decode_steps"], "mean_batch": round(len(questions) * args.max_tokens / max(1, row["decode_steps"]), 1),
                        "ttft_p50_s": row["ttft_p50_s"], "phases": phases})
        print(f"\n{method}: {row['requests_per_s']} requests/s, {row['decode_steps']} steps, wall {row['wall_s']} s")
        for name, p in phases.items():
            print(f"  {name:28s} {p['s']:8.3f} s  {p['calls']:6d} calls  {p['ms_per_call']:8.2f} ms/call")
    engine.close()
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        meta = {"date": datetime.date.today().isoformat(), "device": device, "model": args.model, "torch": torch.__version__,
                "command": "python benchmarks/serve_phases.py " + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
                                                                           if v not in (None, [], False) and k not in ("out", "questions", "distinct_requests", "scenarios"))}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
