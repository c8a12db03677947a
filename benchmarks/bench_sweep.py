"""A sweep of 16 ViT-Tiny variants in one ``vitlab compare`` run against 16 separate
``vitlab flops`` runs (fresh processes each, as a shell loop would do). Prints the time ratio
16 x flops / 1 x compare and checks both give the same FLOPs.

    .venv/bin/python benchmarks/bench_sweep.py
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

RECIPE = "vit_tiny_patch16_224"
DEPTHS = (3, 6, 9, 12)
RATIOS = (2, 3, 4, 5)


def vitlab(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return out.stdout


def main() -> None:
    sweep = ["--sweep", "depth=" + ",".join(map(str, DEPTHS)), "--sweep", "mlp_ratio=" + ",".join(map(str, RATIOS))]
    start = time.perf_counter()
    together = json.loads(vitlab("compare", RECIPE, *sweep, "--format", "json"))
    t_compare = time.perf_counter() - start

    start = time.perf_counter()
    separate = []
    for depth, ratio in itertools.product(DEPTHS, RATIOS):
        separate.append(json.loads(vitlab("flops", RECIPE, "--set", f"depth={depth}", "--set", f"mlp_ratio={ratio}", "--format", "json")))
    t_flops = time.perf_counter() - start

    assert len(together) == len(separate) == 16
    assert [d["flops"] for d in together] == [d["flops"] for d in separate], "compare and flops disagree"
    print(f"16 ViT-Tiny variants: one `vitlab compare` {t_compare:.1f} s, 16 x `vitlab flops` {t_flops:.1f} s")
    print(f"time ratio 16 x flops / compare: {t_flops / t_compare:.2f} "
          f"(per variant: compare {t_compare / 16:.2f} s, flops {t_flops / 16:.2f} s)")


if __name__ == "__main__":
    main()
