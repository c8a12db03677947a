"""Where ViT-Ti's inference time goes (issue 7): torch.profiler self-CPU time by operator, grouped
into matmul-like work, attention, norms, elementwise and layout copies, for vitlab and timm.

    .venv/bin/python benchmarks/profile_tiny.py [--recipe vit_tiny_patch16_224] [--batch-size 32]
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import vitlab

GROUPS = {
    "matmul (linear, conv)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear",
                              "aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention"),
    "norms": ("aten::native_layer_norm", "aten::layer_norm", "aten::_fused_rms_norm", "aten::rms_norm"),
    "activations": ("aten::gelu", "aten::silu"),
    "residual / position adds": ("aten::add", "aten::add_"),
    "layout copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::_unsafe_view", "aten::reshape"),
}


def breakdown(model, x, rounds=5) -> dict[str, float]:
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                model(x)
    total = 0.0
    by = defaultdict(float)
    for evt in prof.key_averages():
        t = evt.self_cpu_time_total
        total += t
        group = next((g for g, ops in GROUPS.items() if evt.key in ops), "other")
        by[group] += t
    return {g: v for g, v in sorted(by.items(), key=lambda kv: -kv[1])}  # microseconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="vit_tiny_patch16_224")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    import timm

    spec = vitlab.load_spec(args.recipe)
    x = torch.randn(args.batch_size, 3, *spec.img_hw)
    ours = breakdown(vitlab.build_model(spec, seed=0).eval(), x)
    theirs = breakdown(timm.create_model(spec.name, pretrained=False).eval(), x)
    base = sum(theirs.values())
    print(f"{spec.name}, batch {args.batch_size}: self CPU time by operator group, as a fraction of timm's total")
    print("| group | vitlab | timm |\n| --- | --- | --- |")
    for g in dict.fromkeys(list(ours) + list(theirs)):
        print(f"| {g} | {ours.get(g, 0) / base:.3f} | {theirs.get(g, 0) / base:.3f} |")
    print(f"| total | {sum(ours.values()) / base:.3f} | 1.000 |")


if __name__ == "__main__":
    main()
