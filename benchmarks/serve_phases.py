"""Where a serving run's time goes: ``serve_load.py``'s shared scenario with its engine's phases timed.

Each phase (the decoding step's forward, the learned scorer inside it, the compression after it,
rows joining and leaving (their caches' copies); the prefill worker's copy of the document's cache, its forward, the
hand-over) is timed on its own thread, its CUDA stream synchronised before and after, so a
phase's time is what it costs that thread, kernels included. The synchronisation itself costs
a little: requests per second here are lower than in ``serve_load.py``, compare methods with
each other, not with its tables. With ``--host-time`` nothing is synchronised: a phase's time is
what the host spends issuing its work (and any wait the code makes itself), so comparing the two
runs says which phases keep the GPU waiting. With ``--profile``, per method, the decoding step's
compressions and scoring are broken down into the PyTorch operations they run, by the function of
``chelsea`` that called each: the host time of each (a wait for the device included: it shows in
the operation that reads a result back), and what is left for Python itself. Timing every
operation slows the run. With ``--cuda-graph`` (the engine's ``cuda_graph``) the step's forward,
scoring included, is timed as one replayed phase. Prints one table per method and writes JSON.

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
import sys
import threading
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import serve_load
from chelsea.cache import ClusteredCache
from chelsea.cli.options import parse_settings
from chelsea.models import load_with_tokenizer
from chelsea.runtime import RowStep
from chelsea.scoring.learned import LearnedScorer
from chelsea.serving import Engine
from chelsea.serving.decoder import Decoder
from chelsea.serving.prefill import PrefillWorker

_totals: dict = defaultdict(lambda: [0.0, 0])
_local = threading.local()
_synced = [True]  # whether phases synchronise the stream (--host-time turns it off)
_profiled = [False]  # whether phases of BROKEN_DOWN time their operations now (--profile: in the measured load only)
_profile = [False]  # --profile
BROKEN_DOWN = ("compress_due", "score_new")
_ops: dict = defaultdict(lambda: [0.0, 0])  # (phase, caller, op) -> [seconds, calls]


class _OpTimer(TorchDispatchMode):
    """Times every PyTorch operation run on this thread inside a phase, by its caller in ``chelsea``."""

    def __init__(self, phase_name: str):
        super().__init__()
        self.phase = phase_name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        row = _ops[(self.phase, caller(), func.overloadpacket.__name__)]
        row[0] += time.perf_counter() - start
        row[1] += 1
        return out


def caller(packages: tuple[str, ...] = ("chelsea",), depth: int = 2) -> str:
    """``file:function`` of the innermost frame (from ``depth`` frames up: the code that ran an
    operation, called from ``__torch_dispatch__``) in one of ``packages``: its path from the
    package on, named after the package when there are several; ``"?"`` if none."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        for package in packages:
            if f"/{package}/" in name:
                where = name.rsplit(f"/{package}/", 1)[1] + ":" + frame.f_code.co_name
                return f"{package}/{where}" if len(packages) > 1 else where
        frame = frame.f_back
    return "?"


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
    timer = _OpTimer(name) if _profiled[0] and name in BROKEN_DOWN and _thread() == "decode" else contextlib.nullcontext()
    try:
        with timer:
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
    _wrap(PrefillWorker, "_start_on_document", "start_on_document")
    _wrap(PrefillWorker, "_hand_over", "hand_over")
    _wrap(PrefillWorker, "_prefill", "prefill")
    if engine.cuda_graph:  # the forward and its scoring are recorded in a graph: time the replayed step as a whole
        _wrap(RowStep, "forward", "forward")
    else:
        _wrap(LearnedScorer, "score_new", "score_new")
    model = engine.model
    forward = model.forward

    def timed_forward(*args, **kwargs):
        if engine.cuda_graph and _thread() == "decode":  # inside a recording: no synchronisation there
            return forward(*args, **kwargs)
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
        _ops.clear()
        _profiled[0] = _profile[0]
        try:
            result = run_load(*args, **kwargs)
        finally:
            _profiled[0] = False
        _load_totals.clear()
        _load_totals.update(_totals)
        return result

    serve_load.run_load = timed


_load_totals: dict = {}


def breakdown(steps: int, top: int = 25) -> dict:
    """Per phase of :data:`BROKEN_DOWN`: its operations by host time, ms per decoding step, each
    with the ``chelsea`` function that ran it; the phase's total and the part no operation took."""
    out = {}
    for name in BROKEN_DOWN:
        rows = sorted(((k[1], k[2], v) for k, v in _ops.items() if k[0] == name), key=lambda r: -r[2][0])
        (total, calls), = [v for (thread, phase_name), v in _load_totals.items() if thread == "decode" and phase_name == name] or [(0.0, 0)]
        if not rows:
            continue
        in_ops = sum(v[0] for _, _, v in rows)
        out[name] = {"ms_per_step": round(1000 * total / steps, 3), "in_operations_ms_per_step": round(1000 * in_ops / steps, 3),
                     "operations_per_step": round(sum(v[1] for _, _, v in rows) / steps, 1),
                     "top": [{"caller": caller, "op": op, "ms_per_step": round(1000 * v[0] / steps, 4),
                              "calls_per_step": round(v[1] / steps, 2)} for caller, op, v in rows[:top]]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--tokenizer")
    parser.add_argument("--context", type=int, default=32000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-budget-gib", type=float, default=16.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--cuda-graph", action="store_true", help="replay each batch's decoding step from a CUDA graph")
    parser.add_argument("--methods", default="chelsea-paper,chelsea")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--host-time", action="store_true", help="do not synchronise around phases: time what the host spends")
    parser.add_argument("--profile", action="store_true", help="break the decoding step's compressions and scoring down into "
                                                                "the operations they run (slows the run)")
    parser.add_argument("--out")
    args = parser.parse_args()
    _synced[0] = not args.host_time
    args.questions, args.distinct_requests, args.scenarios = 1, 1, "shared"

    model, tokenizer = load_with_tokenizer(args.model, args.tokenizer)
    engine = Engine(model, tokenizer, method="full", ratio=0.0, cuda_graph=args.cuda_graph, max_queue=args.clients + 4, reuse_bytes=64 << 30,
                    max_tokens_limit=args.max_tokens, max_batch=args.max_batch, kv_budget=int(args.kv_budget_gib * 2**30),
                    settings=parse_settings(args.set))
    instrument(engine)
    _timed_load()
    docs = serve_load.documents(tokenizer, engine, 1, args.context)
    questions = [engine.question_ids(f"Question {i}: what does the essay say about its main topic?") for i in range(args.clients)]
    results = []
    for method in args.methods.split(","):
        serve_load.measure_method(engine, method, args, docs, questions, rehearse=True, run=0)  # warm-up, not counted
        _profile[0] = args.profile
        row = serve_load.measure_method(engine, method, args, docs, questions, rehearse=False, run=1)[0]
        _profile[0] = False
        phases = {f"{thread}/{name}": {"s": round(t, 3), "calls": n, "ms_per_call": round(1000 * t / max(1, n), 2)}
                  for (thread, name), (t, n) in sorted(_load_totals.items())}
        results.append({"method": method, "requests_per_s": row["requests_per_s"], "wall_s": row["wall_s"],
                        "decode_steps": row["decode_steps"], "mean_batch": round(len(questions) * args.max_tokens / max(1, row["decode_steps"]), 1),
                        "ttft_p50_s": row["ttft_p50_s"], "phases": phases})
        print(f"\n{method}: {row['requests_per_s']} requests/s, {row['decode_steps']} steps, wall {row['wall_s']} s")
        for name, p in phases.items():
            print(f"  {name:28s} {p['s']:8.3f} s  {p['calls']:6d} calls  {p['ms_per_call']:8.2f} ms/call")
        if args.profile:
            results[-1]["profile"] = parts = breakdown(max(1, row["decode_steps"]))
            for name, part in parts.items():
                print(f"  {name}: {part['ms_per_step']} ms per step, {part['in_operations_ms_per_step']} ms in "
                      f"{part['operations_per_step']} operations")
                for r in part["top"]:
                    print(f"    {r['caller'][:44]:44s} {r['op'][:22]:22s} {r['ms_per_step']:8.4f} ms  x{r['calls_per_step']}")
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
