"""Timing, written once: the median of repeated calls (``vitlab bench``, ``--measure``), two callables
alternated in one process, and a ``vitlab`` command timed as a user runs it (``benchmarks/``).

Importing it imports only the standard library; torch is imported when a CUDA device is timed.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any, Callable


def _is_cuda(device: Any) -> bool:
    return device is not None and str(device).startswith("cuda")


def call_times(fn: Callable[[], object], device: Any = None, *, warmup: int = 2, repeats: int = 5) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones.

    On a CUDA ``device`` the time is the device's (CUDA events around the call, then a
    synchronize): kernels run asynchronously, so the host's clock would time only their launch."""
    for _ in range(warmup):
        fn()
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)  # elapsed_time is in milliseconds
        return times
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], device: Any = None, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` (see :func:`call_times`)."""
    return statistics.median(call_times(fn, device, warmup=warmup, repeats=repeats))


def alternate(a: Callable[[], object], b: Callable[[], object], *, warmup: int = 2, rounds: int = 10) -> dict[str, float]:
    """Run ``a`` and ``b`` in turns (a, b, b, a, ...): per-call medians and their ratio a/b.

    Alternating cancels slow drifts (thermal, other load) that back-to-back blocks would not."""
    for _ in range(warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(rounds):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, sink in order:
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    ma, mb = statistics.median(ta), statistics.median(tb)
    ratios = sorted(x / y for x, y in zip(ta, tb))
    return {"a_median_s": ma, "b_median_s": mb, "ratio": ma / mb, "pair_ratio_median": statistics.median(ratios)}


def timed_command(*args: str) -> tuple[float, str]:
    """Run ``python -m vitlab ARGS`` as a user would: (wall seconds, stdout); stops on an error."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return time.perf_counter() - start, out.stdout
