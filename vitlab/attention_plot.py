"""Pictures of attention: the input image and labelled heatmap overlays (matplotlib, Agg)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F


def upsample(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(gh, gw) -> (H, W), bilinear."""
    return F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def attention_figure(
    image: torch.Tensor,
    heatmaps: Sequence[torch.Tensor],
    labels: Sequence[str],
    title: str,
    columns: int = 5,
):
    """A figure: the image first, then one overlay per heatmap with its label.

    Args:
        image: (3, H, W) in [0, 1] (the preprocessed crop the model saw).
        heatmaps: each (gh, gw) in [0, 1].
        labels: one title per heatmap.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(heatmaps)
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.75 * rows + 0.5), squeeze=False,
                             layout="constrained")  # constrained: room for a wrapped title above the panels
    rgb = image.permute(1, 2, 0).cpu().numpy()
    size = tuple(image.shape[-2:])
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(rgb)
    axes.flat[0].set_title("input", fontsize=10)
    for ax, heat, label in zip(list(axes.flat)[1:], heatmaps, labels):
        ax.imshow(rgb)
        ax.imshow(upsample(heat, size).cpu().numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        ax.set_title("\n".join(textwrap.wrap(label, 30)), fontsize=10)  # a panel is ~30 characters wide
    fig.suptitle("\n".join(textwrap.wrap(title, int(22 * cols))), fontsize=11)
    return fig


def save_figure(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
