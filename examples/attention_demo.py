"""Train a small ViT for a minute on procedurally generated pictures, then draw where it attends.

The task (which quadrant holds the bright disc?) can only be solved by finding the disc, so a
trained model's class token should attend to it, unlike a randomly initialised one. No data set
is downloaded: every picture is generated. Writes docs/attention_example.png (the README's
picture) and, with --checkpoint, the trained weights as a vitlab checkpoint.

    .venv/bin/python examples/attention_demo.py [--steps 1000] [--out docs/attention_example.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import vitlab
from vitlab.maps import attention_maps, attention_rollout, patch_heatmap
from vitlab.attention_plot import attention_figure, save_figure
from vitlab.images import normalize, procedural_batch

RECIPE = {
    "name": "demo_vit_64", "img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3,
    "mlp_ratio": 2.0, "num_classes": 4, "reg_tokens": 0,
}


def quadrant(centres: torch.Tensor) -> torch.Tensor:
    """(n, 2) disc centres (y, x) -> class 0..3 (top-left, top-right, bottom-left, bottom-right)."""
    return (centres[:, 0] > 0.5).long() * 2 + (centres[:, 1] > 0.5).long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("docs/attention_example.png"))
    ap.add_argument("--checkpoint", type=Path, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    spec = vitlab.load_spec(RECIPE)
    model = vitlab.build_model(spec, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    model.train()
    for step in range(args.steps):
        images, centres = procedural_batch(args.batch_size, 64, seed=1000 + step)
        loss = F.cross_entropy(model(normalize(images)), quadrant(centres))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)

    model.eval()
    images, centres = procedural_batch(256, 64, seed=7)
    with torch.no_grad():
        acc = (model(normalize(images)).argmax(-1) == quadrant(centres)).float().mean().item()
    print(f"held-out accuracy {acc:.3f} (chance 0.25)")

    image = images[3]
    maps = attention_maps(model, normalize(image)[None])
    grid, prefix = model.ctx.grid_size, model.ctx.num_prefix_tokens
    heats = [patch_heatmap(maps[-1][:, h], grid, prefix, True)[0] for h in range(spec.num_heads)]
    heats.append(patch_heatmap(attention_rollout(maps), grid, prefix, True)[0])
    labels = [f"last layer, head {h}" for h in range(spec.num_heads)] + ["rollout, all layers"]
    fig = attention_figure(image, heats, labels, f"{spec.name} trained {args.steps} steps on generated pictures "
                           f"(accuracy {acc:.2f}): class-token attention")
    save_figure(fig, args.out)
    print(f"wrote {args.out}")
    if args.checkpoint:
        vitlab.save(model, args.checkpoint)
        print(f"wrote {args.checkpoint}")


if __name__ == "__main__":
    main()
