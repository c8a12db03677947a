"""Forward speed against timm after the forward-state change (issue 11): ViT-Ti and ViT-B (no
regression: vitlab/timm <= 1.0 as before) and PiT-Ti, a staged model read from timm (target
<= 1.05). Alternating runs in one process; prints a Markdown table of ratios.

    .venv/bin/python benchmarks/bench_layouts.py [--rounds 10]
"""
from __future__ import annotations

import argparse

import torch

from vitlab.timing import alternate  # noqa: E402

import vitlab  # noqa: E402

# (timm model, batch, target ratio)
CASES = [("vit_tiny_patch16_224", 32, 1.0), ("vit_base_patch16_224", 8, 1.0), ("pit_ti_224", 32, 1.05)]


def _infer(model, x):
    def run():
        with torch.inference_mode():
            model(x)
    return run


def case(name: str, batch: int, rounds: int) -> dict:
    import timm

    theirs = timm.create_model(name, pretrained=False).eval()
    spec = vitlab.spec_from_timm(theirs)
    ours = vitlab.build_model(spec).eval()
    vitlab.load_timm_weights(ours, theirs.state_dict())
    x = torch.randn(batch, 3, *spec.img_hw)
    with torch.inference_mode():  # same function, so the timing compares like with like
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)
    r = alternate(_infer(ours, x), _infer(theirs, x), warmup=2, rounds=rounds)
    return {"model": name, "batch": batch, "ratio": r["ratio"], "pair": r["pair_ratio_median"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | batch | vitlab/timm inference time (median) | median of paired ratios | target |")
    print("| --- | --- | --- | --- | --- |")
    for name, batch, target in CASES:
        r = case(name, batch, args.rounds)
        print(f"| {name} | {batch} | {r['ratio']:.3f} | {r['pair']:.3f} | <= {target:.2f} |", flush=True)


if __name__ == "__main__":
    main()
