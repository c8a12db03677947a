"""vitlab plugin: ``patch_embed: conv_stem``, a convolutional stem instead of the patchify conv.

Xiao et al. 2021, "Early Convolutions Help Transformers See Better": replace ViT's single
stride-p ``p x p`` convolution by a stack of 3x3 stride-2 convolutions, each followed by
BatchNorm and ReLU, then one 1x1 convolution to the embedding width. With ``n`` stride-2 layers
the stem downsamples by ``2**n``, which must be the recipe's ``patch_size``.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

import vitlab

__version__ = "0.1.0"
vitlab_api = 2  # the vitlab plugin API this module is written for (docs/migration.md)


class ConvStem(vitlab.PatchEmbed):
    """Stack of 3x3 stride-2 conv + BatchNorm + ReLU, then a 1x1 conv to embed_dim (Xiao et al. 2021)."""

    name = "conv_stem"

    class Params(vitlab.PatchEmbed.Params):
        channels: tuple[Annotated[int, Field(gt=0)], ...] = Field(
            (24, 48, 96, 192), min_length=1,
            description="output width of each 3x3 stride-2 conv; patch_size must be 2 ** len(channels)",
        )
        bias: bool = Field(True, description="bias of the final 1x1 projection (the 3x3 convs have none: BatchNorm follows)")
        norm: bool = Field(False, description="the recipe's norm over tokens after the projection")

    @classmethod
    def stride(cls, params: Params) -> int:
        return 2 ** len(params.channels)

    @classmethod
    def grid_size(cls, img_size, patch_size, params):
        """Each 3x3 stride-2 conv with padding 1 maps a side s to ceil(s / 2), so any image size
        works: the grid is ceil(H / 2**n) x ceil(W / 2**n) (a partial last patch is zero-padded
        by the convolutions themselves)."""
        s = cls.stride(params)
        return math.ceil(img_size[0] / s), math.ceil(img_size[1] / s)

    @classmethod
    def check(cls, ctx: vitlab.BuildContext, params: Params) -> None:
        s = cls.stride(params)
        if tuple(ctx.patch_size) != (s, s):
            ph, pw = ctx.patch_size
            hint = f"set patch_size: {s}"
            if ph == pw and ph > 1 and ph & (ph - 1) == 0:
                hint += f", or give {ph.bit_length() - 1} channel widths for patch_size {ph}"
            raise ValueError(
                f"has {len(params.channels)} stride-2 convs (channels {list(params.channels)}) that downsample "
                f"by 2**{len(params.channels)} = {s}, but patch_size is {ph}x{pw}: the stem's stride must equal "
                f"the patch size; {hint}"
            )

    def __init__(self, ctx: vitlab.BuildContext, params: Params):
        super().__init__(ctx, params)
        fk = ctx.factory_kwargs
        layers: list[nn.Module] = []
        c_in = ctx.in_chans
        for c_out in params.channels:
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False, **fk),
                nn.BatchNorm2d(c_out, **fk),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, ctx.embed_dim, kernel_size=1, bias=params.bias, **fk)
        self.norm = ctx.make("norm") if params.norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.stem(x))  # (B, D, gh, gw)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, gh * gw, D)


COMPONENTS = (ConvStem,)


@vitlab.hookimpl
def vitlab_register_components(register) -> None:
    for cls in COMPONENTS:
        register(cls)


__all__ = ["ConvStem", "vitlab_register_components"]
