"""Inference forward of vitlab's vit_base_patch16_224 against timm's VisionTransformer of the same
configuration: batch 8, fp32, CPU, alternating runs in one process. Prints the time ratio
vitlab / timm (target <= 1.00).

    .venv/bin/python benchmarks/bench_forward.py [--recipe vit_base_patch16_224] [--batch-size 8]
"""
from __future__ import annotations

import argparse

import torch

from vitlab.timing import alternate  # noqa: E402

import vitlab  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="vit_base_patch16_224")
    ap.add_argument("--timm-name", default=None, help="timm model name (default: the recipe's name)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    import timm

    spec = vitlab.load_spec(args.recipe)
    ours = vitlab.build_model(spec, seed=0).eval()
    theirs = timm.create_model(args.timm_name or spec.name, pretrained=False).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = torch.randn(args.batch_size, 3, *spec.img_hw)

    with torch.inference_mode():
        r = alternate(lambda: ours(x), lambda: theirs(x), rounds=args.rounds)
    print(f"{spec.name} batch {args.batch_size} fp32 CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}")
    print(f"forward time ratio vitlab/timm: {r['ratio']:.3f} (median of per-round ratios {r['pair_ratio_median']:.3f}; target <= 1.00)")


if __name__ == "__main__":
    main()
