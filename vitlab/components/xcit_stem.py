"""XCiT's convolutional patch embedding (timm ``xcit.ConvPatchEmbed``): ``log2(patch_size)``
3x3 stride-2 convolutions, each followed by BatchNorm, with an activation between them, widening
to the embedding width (``D / 8, D / 4, D / 2, D`` for 16 px patches, ``D / 4, D / 2, D`` for 8 px).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..component import PatchEmbed
from ..context import BuildContext
from ..layers import ACTIVATIONS
from .mlp import Activation


def _convs(patch_size) -> int:
    """Stride-2 convolutions of a square power-of-two patch (16 -> 4); ``ValueError`` otherwise."""
    ph, pw = patch_size
    if ph != pw or ph < 2 or ph & (ph - 1):
        raise ValueError(f"stacks stride-2 convolutions, so it needs a square power-of-two patch_size "
                         f"(XCiT: 8 or 16), got {ph}x{pw}")
    return ph.bit_length() - 1


class XcitStem(PatchEmbed):
    """3x3 stride-2 conv + BatchNorm per halving, activation between, widening to embed_dim (XCiT)."""

    name = "xcit_stem"

    class Params(PatchEmbed.Params):
        act: Activation = "gelu"

    @classmethod
    def grid_size(cls, img_size, patch_size, params: Params):
        """A 3x3 stride-2 convolution with padding 1 maps a side s to ceil(s / 2): any image size
        works (a partial last patch sees the convolutions' zero padding, as in timm)."""
        halvings = _convs(patch_size)
        return tuple(math.ceil(side / 2**halvings) for side in img_size)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        first = ctx.embed_dim // 2 ** (_convs(ctx.patch_size) - 1)
        if first < 1:
            raise ValueError(f"halves embed_dim {ctx.embed_dim} back to its first convolution's width, "
                             f"which would be 0 for patch_size {ctx.patch_size[0]}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, n, D = ctx.factory_kwargs, _convs(ctx.patch_size), ctx.embed_dim
        widths = [ctx.in_chans] + [D // 2 ** (n - 1 - i) for i in range(n)]  # timm's integer halving
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            if i:
                layers.append(ACTIVATIONS[params.act]())
            # timm's ``conv3x3``: (conv, bn) as one Sequential, so names are ``proj.{2 i}.{0, 1}``
            layers.append(nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False, **fk),
                nn.BatchNorm2d(c_out, **fk)))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh * gw, D)


COMPONENTS = (XcitStem,)
