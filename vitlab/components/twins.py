"""Twins' pieces (Chu et al. 2021; timm ``twins``) that vitlab did not have already.

Twins-SVT alternates locally-grouped attention (``window`` with ``rel_pos: none``: windows of the
grid, zero-padded, no bias) with global sub-sampled attention (``sra``, PVT's spatial reduction);
Twins-PCPVT uses ``sra`` only. Both run CPVT's position generator after the first block of each
stage, in that stage's width: ``prenorm_peg``, a pre-norm block followed by the generator
(``peg``'s depthwise convolution), selected for those blocks through ``layers``.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..context import BuildContext
from ..limits import LIMITS
from ..state import ForwardState
from .block import PreNormBlock
from .pos_embed import PositionGenerator


class PreNormPegBlock(PreNormBlock):
    """Pre-norm block followed by CPVT's position generator in the block's own width (Twins: the first block of each stage)."""

    name = "prenorm_peg"

    class Params(PreNormBlock.Params):
        kernel_size: int = Field(3, gt=0, le=LIMITS["img_size"], description="odd side of the generator's depthwise convolution")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.kernel_size % 2 == 0:
            raise ValueError(f"needs an odd kernel_size (the grid keeps its size), got {params.kernel_size}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        # peg's own module, run after this block: weights ``peg.proj`` in this stage's width
        self.peg = PositionGenerator(ctx, PositionGenerator.Params(at_block=ctx.block_index or 0,
                                                                   kernel_size=params.kernel_size))

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        return self.peg.after_block(super().forward(x, state), state)


COMPONENTS = (PreNormPegBlock,)
