"""Issue 14's ratios over the bundled ViT-Tiny variants, from one ``vitlab compare --measure`` run
(each variant in its own process, CPU, batch 8):

* predicted / measured training peak memory (and inference peak);
* time per FLOP of each variant's training step / the baseline's (vit_tiny_patch16_224);
* ``--measure`` overhead per variant: (wall time of compare --measure - the same compare without
  --measure) / variants, over the timed work inside (warm-up + repeats of inference and training).

    .venv/bin/python benchmarks/bench_cost.py
"""
from __future__ import annotations

import json
from pathlib import Path

from vitlab.timing import timed_command  # noqa: E402  (python -m vitlab, timed)

RECIPES = sorted(p.stem for p in Path("recipes").glob("vit_tiny_*.yaml"))
BATCH, REPEATS, WARMUP = 8, 3, 3


def main() -> None:
    t_count, _ = timed_command("compare", *RECIPES, "-b", str(BATCH), "--format", "json")
    t_measure, text = timed_command("compare", *RECIPES, "-b", str(BATCH), "--measure", "--repeats", str(REPEATS), "--format", "json")
    rows = json.loads(text)
    base = next(r for r in rows if r["name"] == "vit_tiny_patch16_224")
    base_tpf = base["measured"]["train_step_ms"] / base["flops"]
    print("| variant | predicted / measured train peak | predicted / measured infer peak | time per FLOP / baseline's |")
    print("| --- | --- | --- | --- |")
    work = 0.0
    for r in rows:
        m = r["measured"]
        work += (WARMUP + REPEATS) * (m["infer_ms"] + m["train_step_ms"]) / 1000
        print(f"| {r['name']} | {r['memory']['train_peak_bytes'] / m['train_peak_bytes']:.2f} | "
              f"{r['memory']['infer_peak_bytes'] / m['infer_peak_bytes']:.2f} | "
              f"{m['train_step_ms'] / r['flops'] / base_tpf:.2f} |")
    overhead = (t_measure - t_count - work) / work
    print(f"\n--measure overhead per variant / its timed work: {overhead:.2f} ({len(rows)} variants)")


if __name__ == "__main__":
    main()
