"""Talking-heads attention (Shazeer et al. 2020), as CaiT's self-attention blocks use it (timm
``cait.TalkingHeadAttn``): the heads' logits are mixed by a learned linear map across heads before
the softmax (``proj_l``), and the probabilities again after it (``proj_w``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..context import BuildContext
from ..layers import Linear
from .attention import MultiHeadSelfAttention


def _across_heads(linear: Linear, attn: torch.Tensor) -> torch.Tensor:
    """(B, heads, Nq, Nk) -> each position's vector of heads through ``linear`` -> (B, heads, Nq, Nk)."""
    return linear(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TalkingHeadsAttention(MultiHeadSelfAttention):
    """Multi-head self-attention whose heads talk: linear maps across heads before and after the
    softmax (CaiT). Always on the explicit path (the fused kernel cannot mix heads); the recorded
    map is the softmax's probabilities, before ``proj_w`` mixes them."""

    name = "talking_heads"

    @classmethod
    def check(cls, ctx: BuildContext, params: MultiHeadSelfAttention.Params) -> None:
        super().check(ctx, params)
        if params.kv_heads not in (None, ctx.num_heads):
            raise ValueError(f"mixes every head's logits: it needs a key and value head per query head "
                             f"(kv_heads {params.kv_heads} of {ctx.num_heads})")

    def __init__(self, ctx: BuildContext, params: MultiHeadSelfAttention.Params):
        super().__init__(ctx, params)
        h, fk = ctx.num_heads, ctx.factory_kwargs
        self.proj_l = Linear(h, h, **fk)  # logits, before the softmax
        self.proj_w = Linear(h, h, **fk)  # probabilities, after it

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v (B, heads, N, head_dim) -> (B, heads, N, head_dim); ``bias`` joins the logits
        before the heads mix."""
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, Nq, Nk)
        if bias is not None:
            attn = attn + bias
        attn = _across_heads(self.proj_l, attn).softmax(dim=-1)
        if self.record_maps:
            self.attn_map = attn.detach()
        attn = _across_heads(self.proj_w, attn)
        if dropout_p:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v


COMPONENTS = (TalkingHeadsAttention,)
