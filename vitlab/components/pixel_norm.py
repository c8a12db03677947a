"""A linear patch embedding of images normalised inside the embedder, (x - mean) / std: Gemma 4's
vision tower takes [0, 1] pixels and maps them to [-1, 1] itself (mean 0.5, std 0.5)."""
from __future__ import annotations

import torch
from pydantic import Field

from .patch_embed import LinearPatchEmbed


class PixelNormLinearPatchEmbed(LinearPatchEmbed):
    """``linear`` patch embedding of (images - pixel_mean) / pixel_std (Gemma 4: [0, 1] -> [-1, 1])."""

    name = "linear_pixnorm"

    class Params(LinearPatchEmbed.Params):
        pixel_mean: float = 0.5
        pixel_std: float = Field(0.5, gt=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.params.pixel_mean) / self.params.pixel_std)


COMPONENTS = (PixelNormLinearPatchEmbed,)
