"""Alternating timing of two callables in one process: the fair way to compare on a noisy box."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Callable


def alternate(a: Callable[[], object], b: Callable[[], object], *, warmup: int = 2, rounds: int = 10) -> dict:
    """Run ``a`` and ``b`` in turns (a, b, b, a, ...) and return per-call medians and their ratio a/b.

    Alternating cancels slow drifts (thermal, other load) that back-to-back blocks would not.
    """
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(rounds):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, sink in order:
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    ma, mb = statistics.median(ta), statistics.median(tb)
    ratios = sorted(x / y for x, y in zip(ta, tb))
    return {"a_median_s": ma, "b_median_s": mb, "ratio": ma / mb, "pair_ratio_median": statistics.median(ratios)}


def vitlab(*args: str) -> tuple[float, str]:
    """Run ``python -m vitlab ARGS`` as a user would: (wall seconds, stdout); stops on an error."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return time.perf_counter() - start, out.stdout
