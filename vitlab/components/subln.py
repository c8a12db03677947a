"""Multi-head self-attention with a norm before its output projection: the "sub-LN" of
Magneto / BEiT-3 and EVA-02's CLIP towers (timm ``scale_attn_norm`` / ``scale_attn_inner``)."""
from __future__ import annotations

import torch

from ..context import BuildContext
from .attention import MultiHeadSelfAttention


class SubLnAttention(MultiHeadSelfAttention):
    """Multi-head self-attention, its heads' output normed (the recipe's norm) before ``proj``."""

    name = "mhsa_subln"

    def __init__(self, ctx: BuildContext, params: MultiHeadSelfAttention.Params):
        super().__init__(ctx, params)
        self.norm = ctx.make("norm")  # over all heads, (B, N, D): timm's ``attn.norm``

    def out(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> norm -> (B, N, D) through the output projection."""
        B, _, N, _ = x.shape
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, -1))))


COMPONENTS = (SubLnAttention,)
