"""NesT's pieces (Zhang et al. 2021, "Nested Hierarchical Transformer"; timm ``nest``), each usable
in any recipe.

NesT cuts the patch grid into non-overlapping blocks and, at each level, attends within each block:
that is ``window`` attention (no shift, no bias) whose window is the block. timm keeps the tokens
"blockified", (B, blocks, tokens per block, D); vitlab keeps them in raster order on the grid, which
attention inside a window does not see. Each level adds a learned position table of its own, one
row per token of the level (timm's ``pos_embed`` (1, blocks, tokens per block, D) is the grid's
table in blockified order): the first level's is the recipe's ``learned`` position embedding, each
later level's the one inside the transition into it.

* ``conv_pool``: NesT's block aggregation between levels (timm's ``ConvPool``): a 3x3 convolution to
  the next width, a norm over the channels, a 3x3 max pool of stride 2 (padding 1, or TF "same" for
  the ``_jx`` models), then optionally the recipe's position embedding again, for the new grid.
* ``adaptive_avg``: the average over the grid as timm's NCHW heads pool it (``adaptive_avg_pool2d``,
  which fvcore counts, one addition per element; ``avg``'s mean is free).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Transition
from ..context import BuildContext
from ..layers import Linear
from ..state import ForwardState
from .pool import AvgPool
from .pvt import to_image, to_tokens


def same_pads(side: int, kernel: int = 3, stride: int = 2) -> tuple[int, int]:
    """TF "SAME" padding of one axis (before, after): the output is ceil(side / stride)."""
    total = max((-(-side // stride) - 1) * stride + kernel - side, 0)
    return total // 2, total - total // 2


class ConvPool(Transition):
    """NesT's block aggregation: a 3x3 convolution to the new width, the recipe's norm, a 3x3 max pool of stride 2; optionally the recipe's position embedding again on the new grid (timm ConvPool)."""

    name = "conv_pool"

    class Params(Transition.Params):
        padding: Literal["symmetric", "same"] = Field(
            "symmetric", description="the max pool's padding: symmetric (1 on each side) or TF 'same' (the "
            "_jx models: 0 before, 1 after on an even side); both halve the grid, rounding up")
        pos_embed: StrictBool = Field(
            False, description="add the recipe's position embedding, built for this stage's grid and width, "
            "after pooling (NesT: a learned table per level)")

    @classmethod
    def out_grid(cls, grid, params: Params):
        return tuple(-(-g // 2) for g in grid)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk = ctx.factory_kwargs
        self.padding = params.padding
        self.conv = nn.Conv2d(ctx.in_dim, ctx.embed_dim, 3, padding=1, **fk)
        self.norm = ctx.make("norm")
        # prefix tokens (class, registers) get a linear map of their own, as PiT's and Swin's transitions
        self.fc = Linear(ctx.in_dim, ctx.embed_dim, **fk) if ctx.num_prefix_tokens else None
        out = ctx.replace(grid_size=self.out_grid(ctx.grid_size, params))
        self.pos_embed = out.make("pos_embed") if params.pos_embed else None

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}' (stage {state.stage_index})")
        state.check_tokens(x, f"transition '{self.name}'")
        P = state.num_prefix
        image = self.conv(to_image(x[:, P:], grid))  # (B, D_out, gh, gw)
        image = to_image(self.norm(to_tokens(image)), grid)  # the norm over the channels
        if self.padding == "same":  # timm's MaxPool2dSame: pads of -inf, never the maximum
            (t, b), (l, r) = (same_pads(g) for g in grid)
            image = F.max_pool2d(F.pad(image, (l, r, t, b), value=-float("inf")), 3, 2)
        else:
            image = F.max_pool2d(image, 3, 2, 1)  # (B, D_out, ceil(gh / 2), ceil(gw / 2))
        patches = to_tokens(image)
        x = torch.cat([self.fc(x[:, :P]), patches], dim=1) if self.fc is not None else patches
        state = state.regrid(self.out_grid(grid, self.params))  # plain ints: a trace's shapes would count arithmetic
        if self.pos_embed is not None:
            x = self.pos_embed(x, state)
        return x, state


class AdaptiveAvgPool(AvgPool):
    """Mean over the patch tokens as timm's NCHW heads take it (an adaptive average pool, which fvcore counts: one addition per element), optional norm after pooling."""

    name = "adaptive_avg"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, self.num_prefix:].transpose(1, 2)[..., None]  # (B, D, N, 1): the grid's shape does not matter
        return self.norm(F.adaptive_avg_pool2d(patches, 1).flatten(1))  # (B, D)


COMPONENTS = (ConvPool, AdaptiveAvgPool)
