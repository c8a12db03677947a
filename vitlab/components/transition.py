"""Transitions between stages: (B, P + N, D_in) on one grid -> (B, P + N', D_out) on the next.

Both built-ins map the patch tokens on their grid and the prefix tokens (class, registers) with a
linear map of their own, as PiT does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Transition
from ..context import BuildContext
from ..layers import Linear
from ..state import ForwardState
from ..limits import LIMITS


def _grid_tokens(x: torch.Tensor, state: ForwardState, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P + gh * gw, D) -> prefix (B, P, D) and patches as an image (B, D, gh, gw)."""
    gh, gw = state.require_grid(f"transition '{who}' (stage {state.stage_index})")
    state.check_tokens(x, f"transition '{who}'")
    P = state.num_prefix
    prefix, patches = x[:, :P], x[:, P:]
    return prefix, patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)


class PitPooling(Transition):
    """PiT's pooling: a strided depthwise convolution of the patch grid that widens the tokens,
    and a linear map of the prefix tokens (Heo et al. 2021; timm ``pit.Pooling``)."""

    name = "pit_pool"

    class Params(Transition.Params):
        stride: int = Field(2, gt=0, le=LIMITS["img_size"], description="grid stride; the kernel is stride + 1, padding stride // 2")

    @classmethod
    def out_grid(cls, grid, params: Params):
        s = params.stride
        k, pad = s + 1, s // 2
        return tuple((g + 2 * pad - k) // s + 1 for g in grid)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.embed_dim % ctx.in_dim:
            raise ValueError(f"needs the stage's embed_dim {ctx.embed_dim} to be a multiple of the previous "
                             f"stage's {ctx.in_dim} (a depthwise convolution: each channel widens to several)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        s, fk = params.stride, ctx.factory_kwargs
        self.stride = s
        # groups = in channels: channel c feeds outputs c * m ... c * m + m - 1 (m = out / in)
        self.conv = nn.Conv2d(ctx.in_dim, ctx.embed_dim, kernel_size=s + 1, padding=s // 2, stride=s,
                              groups=ctx.in_dim, **fk)
        self.fc = Linear(ctx.in_dim, ctx.embed_dim, **fk)

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        prefix, grid = _grid_tokens(x, state, self.name)
        grid = self.conv(grid)  # (B, D_out, gh', gw')
        patches = grid.flatten(2).transpose(1, 2)  # (B, gh' * gw', D_out)
        x = torch.cat([self.fc(prefix), patches], dim=1)
        return x, state.regrid(tuple(grid.shape[-2:]))


class PatchMerging(Transition):
    """Swin's patch merging: each 2 x 2 group of patches concatenated (4 D_in), normed, mapped to
    D_out; the grid halves (odd sides are zero-padded). Prefix tokens get a linear map of their own.

    ``norm_last``: mapped to D_out first, then normed over D_out (Swin v2's ``PatchMerging``)."""

    name = "patch_merge"

    class Params(Transition.Params):
        norm_last: StrictBool = Field(False, description="the norm after the reduction, over D_out (Swin v2)")

    @classmethod
    def out_grid(cls, grid, params):
        return tuple(math.ceil(g / 2) for g in grid)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk = ctx.factory_kwargs
        self.norm_last = params.norm_last
        self.norm = ctx.make("norm", dim=ctx.embed_dim if params.norm_last else 4 * ctx.in_dim)
        self.reduction = Linear(4 * ctx.in_dim, ctx.embed_dim, bias=False, **fk)
        self.fc = Linear(ctx.in_dim, ctx.embed_dim, **fk) if ctx.num_prefix_tokens else None

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        prefix, grid = _grid_tokens(x, state, self.name)
        B, D, gh, gw = grid.shape
        grid = F.pad(grid, (0, gw % 2, 0, gh % 2))
        h, w = grid.shape[-2] // 2, grid.shape[-1] // 2
        # (B, D, h, 2, w, 2) -> (B, h, w, 2 (col), 2 (row), D): timm's PatchMerging order
        merged = grid.reshape(B, D, h, 2, w, 2).permute(0, 2, 4, 5, 3, 1).reshape(B, h * w, 4 * D)
        if self.norm_last:
            patches = self.norm(self.reduction(merged))  # (B, h * w, D_out)
        else:
            patches = self.reduction(self.norm(merged))
        parts = [self.fc(prefix), patches] if self.fc is not None else [patches]
        return torch.cat(parts, dim=1), state.regrid((h, w))


COMPONENTS = (PitPooling, PatchMerging)
