"""Sweeps at grid-search scale (issue 14): one ``vitlab compare`` over 900 variants
(embed_dim x num_heads x depth x mlp_ratio x pos_embed) against one ``vitlab flops`` of the
baseline recipe, both as commands in fresh processes (what a user runs), alternated; prints the
ratio sweep / one count (goal <= 5). Also checks a sample of the sweep against full traces.

    .venv/bin/python benchmarks/bench_sweep.py            # the 900-variant grid
    .venv/bin/python benchmarks/bench_sweep.py --small    # 16 ViT-Tiny variants, plus 16 x flops / compare
"""
from __future__ import annotations

import json
import statistics
import sys

from vitlab.timing import timed_command  # noqa: E402  (python -m vitlab, timed)

RECIPE = "vit_tiny_patch16_224"
GRID = ["embed_dim=128,192,256,320,384", "num_heads=2,4,8", "depth=2,4,6,8,12", "mlp_ratio=2,3,4,6",
        "pos_embed.name=learned,sincos2d,none"]  # 5 x 3 x 5 x 4 x 3 = 900
SMALL = ["depth=3,6,9,12", "mlp_ratio=2,3,4,5"]


def main() -> None:
    grid = SMALL if "--small" in sys.argv else GRID
    sweep = [a for g in grid for a in ("--sweep", g)]
    one, whole = [], []
    rows = None
    for _ in range(2):  # alternated, so machine drift falls on both
        one.append(timed_command("flops", RECIPE, "--format", "json")[0])
        t, text = timed_command("compare", RECIPE, *sweep, "--format", "json")
        whole.append(t)
        rows = json.loads(text)
    n = len(rows)
    ratio = statistics.median(whole) / statistics.median(one)
    print(f"{n} variants: one `vitlab compare` sweep / one `vitlab flops` = {ratio:.2f} (goal <= 5)")

    # exactness on a sample: the sweep's rows against single full counts
    sys.path.insert(0, ".")
    import vitlab as vl

    for row in rows[:: max(1, n // 12)]:
        changes = dict(kv.split("=", 1) for kv in row["name"].split("[", 1)[1][:-1].split(","))
        full = vl.analyze(RECIPE, overrides=[f"{k}={v}" for k, v in changes.items()], method="full")
        assert (full.flops, full.params, full.activations, full.memory) == (
            row["flops"], row["params"], row["activations"], row["memory"]), row["name"]
    print(f"sample of {len(rows[:: max(1, n // 12)])} variants: equal to full traces (FLOPs, params, activations, memory)")
    if "--small" in sys.argv:
        t16 = sum(timed_command("flops", RECIPE, *(a for kv in _pairs(r["name"]) for a in ("--set", kv)), "--format", "json")[0]
                  for r in rows)
        print(f"16 x `vitlab flops` / one `vitlab compare`: {t16 / statistics.median(whole):.2f}")


def _pairs(name: str) -> list[str]:
    return name.split("[", 1)[1][:-1].split(",") if "[" in name else []


if __name__ == "__main__":
    main()
