"""A position generator that acts after one block, written the way docs/plugins.md teaches, without
``acts_after``: a depthwise 3 x 3 convolution over the patch grid added to the tokens after block
``at_block`` (CPVT's PEG). Derived counts must stay right without the optional hook."""
import torch
from pydantic import Field
from torch import nn

import vitlab

vitlab_api = 2  # the plugin API this module targets


class PegAfter(vitlab.PosEncoding):
    """CPVT-style position generator after one block (test plugin, no ``acts_after``)."""

    name = "peg_after_test"

    class Params(vitlab.PosEncoding.Params):
        at_block: int = Field(0, ge=0)

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        self.at_block = params.at_block
        self.proj = nn.Conv2d(ctx.embed_dim, ctx.embed_dim, 3, padding=1, groups=ctx.embed_dim, **ctx.factory_kwargs)

    def forward(self, x, state):
        return x

    def after_block(self, x, state):
        if state.block_index != self.at_block:
            return x
        gh, gw = state.grid
        P = state.num_prefix
        B, _, D = x.shape
        grid = x[:, P:].transpose(1, 2).reshape(B, D, gh, gw)  # (B, D, gh, gw)
        return torch.cat([x[:, :P], (self.proj(grid) + grid).flatten(2).transpose(1, 2)], dim=1)


@vitlab.hookimpl
def vitlab_register_components(register):
    register(PegAfter)
