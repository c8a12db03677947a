"""Patch embedders: images (B, C, H, W) -> tokens (B, gh * gw, D)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from typing import Annotated, Optional

from pydantic import Field, StrictBool
from torch import nn

from ..component import PatchEmbed
from ..context import BuildContext
from ..layers import Linear


def _pad_to_patches(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Zero-pad bottom/right so H and W divide into patches (timm's dynamic_img_pad)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % patch[0], (-w) % patch[1]
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class _PatchifyBase(PatchEmbed):
    class Params(PatchEmbed.Params):
        bias: StrictBool = True
        norm: StrictBool = False  # the recipe's norm over tokens right after the projection
        pad: StrictBool = False  # zero-pad images that do not divide into patches

    @classmethod
    def grid_size(cls, img_size, patch_size, params):
        if params.pad:
            return math.ceil(img_size[0] / patch_size[0]), math.ceil(img_size[1] / patch_size[1])
        return super().grid_size(img_size, patch_size, params)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.patch_size = ctx.patch_size
        self.pad = params.pad
        self.norm = ctx.make("norm") if params.norm else nn.Identity()


class ConvPatchEmbed(_PatchifyBase):
    """Conv2d patchify: a convolution with kernel equal to the patch, stride the patch (original
    ViT) or less (overlapping patches, PiT)."""

    name = "conv"

    class Params(_PatchifyBase.Params):
        stride: Optional[Annotated[int, Field(gt=0)]] = Field(
            None, description="step between patches in pixels; null = the patch size (no overlap)")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.stride is not None and params.pad:
            raise ValueError("pads images to whole patches, which needs stride null (the patch size)")

    @classmethod
    def grid_size(cls, img_size, patch_size, params: Params):
        if params.stride is None:
            return super().grid_size(img_size, patch_size, params)
        s = params.stride
        (h, w), (ph, pw) = img_size, patch_size
        if h < ph or w < pw:
            raise ValueError(f"image size {h}x{w} is smaller than one {ph}x{pw} patch")
        return (h - ph) // s + 1, (w - pw) // s + 1  # a valid convolution: no padding

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        stride = ctx.patch_size if params.stride is None else (params.stride, params.stride)
        self.proj = nn.Conv2d(
            ctx.in_chans, ctx.embed_dim, kernel_size=ctx.patch_size, stride=stride,
            bias=params.bias, **ctx.factory_kwargs,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = _pad_to_patches(x, self.patch_size)
        x = self.proj(x)  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, gh * gw, D)
        return self.norm(x)


class LinearPatchEmbed(_PatchifyBase):
    """Unfold into flattened patches, then one Linear; equals ``conv`` given the same weights."""

    name = "linear"

    def __init__(self, ctx: BuildContext, params: _PatchifyBase.Params):
        super().__init__(ctx, params)
        ph, pw = ctx.patch_size
        # Linear over (C, ph, pw)-ordered patch pixels: the flattening order of a conv kernel.
        self.proj = Linear(ctx.in_chans * ph * pw, ctx.embed_dim, bias=params.bias, **ctx.factory_kwargs)
        nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5))  # same init as the conv

    # (B, C, gh, ph, gw, pw) -> (B, gh, gw, C, ph, pw): each patch flattened channel-major, as a
    # conv kernel is (a subclass may flatten in another order)
    PATCH_ORDER = (0, 2, 4, 1, 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = _pad_to_patches(x, self.patch_size)
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        gh, gw = H // ph, W // pw
        x = x.reshape(B, C, gh, ph, gw, pw).permute(*self.PATCH_ORDER)
        x = x.reshape(B, gh * gw, C * ph * pw)
        return self.norm(self.proj(x))  # (B, gh * gw, D)


COMPONENTS = (ConvPatchEmbed, LinearPatchEmbed)
