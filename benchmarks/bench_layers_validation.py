"""Validation of recipes with many ``layers`` entries grows linearly (issue 21): n full entries
(every block kind and an MLP ratio, each naming every block of an n-block model) validated at n and
at 4n; prints the time ratio (linear: ~4, quadratic: ~16). Before, every entry was applied to every
block it names, n x n work: thousands of entries took minutes.

    .venv/bin/python benchmarks/bench_layers_validation.py [n]      # default n = 1000
"""
from __future__ import annotations

import sys
import time

import vitlab


def _validate(n: int) -> float:
    layers = [{"at": f"0-{n - 1}", "attention": {"name": "mhsa", "params": {"qkv_bias": True}}, "mlp": {"name": "mlp"},
               "norm": {"name": "layernorm"}, "block": {"name": "prenorm"}, "mlp_ratio": 4.0} for i in range(n)]
    data = {"name": "many_layers", "depth": n, "embed_dim": 64, "num_heads": 2, "img_size": 32, "patch_size": 16,
            "layers": layers}
    start = time.perf_counter()
    vitlab.load_spec(data)
    return time.perf_counter() - start


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    _validate(10)  # imports and the registry, outside the timing
    small, large = min(_validate(n) for _ in range(2)), min(_validate(4 * n) for _ in range(2))
    print(f"{n} -> {4 * n} layers entries: validation time x{large / small:.2f} (linear ~4, quadratic ~16)")


if __name__ == "__main__":
    main()
