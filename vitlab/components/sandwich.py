"""The sandwich block: each residual branch normed before and after (Gemma 2-4, "sandwich norm"
of CogView), norms named as timm's ``Gemma4Block``: ``norm1`` / ``norm2`` around the attention,
``norm3`` / ``norm4`` around the MLP."""
from __future__ import annotations

import torch

from ..context import BuildContext
from ..state import ForwardState
from .block import TwoBranchBlock


class SandwichBlock(TwoBranchBlock):
    """Sandwich norms: x + norm2(attn(norm1(x))), then x + norm4(mlp(norm3(x))) (Gemma 4)."""

    name = "sandwich"

    def __init__(self, ctx: BuildContext, params: TwoBranchBlock.Params):
        super().__init__(ctx, params)
        self.norm3 = ctx.make("norm")
        self.norm4 = ctx.make("norm")

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.norm2(self.attn(self.norm1(x), state))))
        x = x + self.drop_path2(self.ls2(self.norm4(self.mlp(self.norm3(x)))))
        return x


COMPONENTS = (SandwichBlock,)
