"""CUDA-event timing shared by the standalone benchmarks in this folder."""

from __future__ import annotations

import torch


def median_seconds(fn, reps: int = 50, warmup: int = 5, gpu_only: bool = False) -> float:
    """Median time of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones, from CUDA events.

    The host's launch time is inside it whenever the GPU waits for the host. ``gpu_only`` queues
    each call behind a GPU spin of about 0.1 s, so the host has issued all of the call before the
    GPU starts on it: the GPU's time alone (valid as long as ``fn`` never waits for the GPU).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if gpu_only:
            torch.cuda._sleep(200_000_000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] / 1000.0
