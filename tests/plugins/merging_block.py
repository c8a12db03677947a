"""A token-merging block (ToMe-like, simplified so a test can compute its output by hand): after
attention it averages the last ``2 r`` patch tokens in adjacent pairs, ``r`` fewer tokens out.
The merged tokens leave the patch grid: it returns ``state.regrid(None, num_tokens=...)``.

With ``carry_positions`` it merges a position encoding's attention bias the way it merges tokens
(each merged row and column the mean of its pair: ``M bias Mᵀ``) and hands it on, so later blocks
keep a relative position bias instead of refusing."""
import torch
from pydantic import Field

import vitlab

vitlab_api = 2  # the plugin API this module targets


class PairMergeBlock(vitlab.Block):
    """Pre-norm block that merges the last 2r patch tokens pairwise after attention."""

    name = "pair_merge"

    class Params(vitlab.Block.Params):
        r: int = Field(4, ge=0, description="tokens merged away by this block")
        carry_positions: bool = Field(False, description="merge the position bias with the tokens")

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        self.r, self.carry = params.r, params.carry_positions
        self.norm1, self.attn = ctx.make("norm"), ctx.make("attention")
        self.norm2, self.mlp = ctx.make("norm"), ctx.make("mlp")

    def forward(self, x: torch.Tensor, state: vitlab.ForwardState):
        x = x + self.attn(self.norm1(x), state)
        B, T, D = x.shape
        r = min(self.r, (T - state.num_prefix) // 2)
        if r:  # (B, 2r, D) -> (B, r, 2, D) -> mean of each pair
            x = torch.cat([x[:, : T - 2 * r], x[:, T - 2 * r:].reshape(B, r, 2, D).mean(2)], dim=1)
        x = x + self.mlp(self.norm2(x))
        carried = {}
        if self.carry and state.attn_bias is not None and state.qk_transform is None:
            # M (T - r, T): identity on the kept tokens, 1/2 on both members of each merged pair
            keep = torch.eye(T - 2 * r, T, dtype=x.dtype, device=x.device)
            pairs = torch.eye(r, dtype=x.dtype, device=x.device).repeat_interleave(2, dim=1) / 2  # (r, 2r)
            M = torch.cat([keep, torch.cat([x.new_zeros(r, T - 2 * r), pairs], dim=1)], dim=0)
            carried["attn_bias"] = M @ state.attn_bias @ M.T  # (.., heads, T - r, T - r)
        return x, state.regrid(None, num_tokens=x.shape[1], **carried)


@vitlab.hookimpl
def vitlab_register_components(register):
    register(PairMergeBlock)
