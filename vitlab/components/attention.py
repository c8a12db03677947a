"""Multi-head self-attention on the fused ``scaled_dot_product_attention`` kernel."""
from __future__ import annotations

import torch
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention, QKTransform
from ..context import BuildContext
from ..layers import Linear


class MultiHeadSelfAttention(Attention):
    """Multi-head self-attention (fused SDPA), optional qk-norm; records maps on request."""

    name = "mhsa"

    class Params(Attention.Params):
        qkv_bias: StrictBool = True
        proj_bias: StrictBool = True
        qk_norm: StrictBool = False  # the recipe's norm over head_dim on queries and keys (ViT-22B)
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.num_heads = ctx.num_heads
        self.head_dim = ctx.head_dim
        self.attn_drop = params.attn_drop
        self.qkv = Linear(ctx.embed_dim, 3 * ctx.embed_dim, bias=params.qkv_bias, **ctx.factory_kwargs)
        self.q_norm = ctx.make("norm", dim=ctx.head_dim) if params.qk_norm else nn.Identity()
        self.k_norm = ctx.make("norm", dim=ctx.head_dim) if params.qk_norm else nn.Identity()
        self.proj = Linear(ctx.embed_dim, ctx.embed_dim, bias=params.proj_bias, **ctx.factory_kwargs)
        self.proj_drop = nn.Dropout(ctx.proj_drop)

    def forward(self, x: torch.Tensor, qk_transform: QKTransform | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)  # each (B, h, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if qk_transform is not None:
            q, k = qk_transform(q, k)
        x = self.attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)  # (B, h, N, hd)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


COMPONENTS = (MultiHeadSelfAttention,)
