"""Multi-head self-attention on the fused ``scaled_dot_product_attention`` kernel.

``QKVAttention`` holds what every softmax-free or local variant shares (the fused qkv projection,
qk-norm, the output projection); plugins subclass it and write only how tokens are mixed.
"""
from __future__ import annotations

import torch
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention, QKTransform
from ..context import BuildContext
from ..layers import Linear


class QKVAttention(Attention):
    """Base of attention variants: qkv projection (timm's ``attn.qkv``), optional qk-norm, output
    projection (``attn.proj``). Not registered itself: it has no ``forward``."""

    class Params(Attention.Params):
        qkv_bias: StrictBool = True
        proj_bias: StrictBool = True
        qk_norm: StrictBool = False  # the recipe's norm over head_dim on queries and keys (ViT-22B)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.num_heads = ctx.num_heads
        self.head_dim = ctx.head_dim
        self.num_prefix = ctx.num_prefix_tokens
        self.qkv = Linear(ctx.embed_dim, 3 * ctx.embed_dim, bias=params.qkv_bias, **ctx.factory_kwargs)
        self.q_norm = ctx.make("norm", dim=ctx.head_dim) if params.qk_norm else nn.Identity()
        self.k_norm = ctx.make("norm", dim=ctx.head_dim) if params.qk_norm else nn.Identity()
        self.proj = Linear(ctx.embed_dim, ctx.embed_dim, bias=params.proj_bias, **ctx.factory_kwargs)
        self.proj_drop = nn.Dropout(ctx.proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v, each (B, heads, N, head_dim); q and k normed."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def out(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> (B, N, D) through the output projection."""
        B, _, N, _ = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


class MultiHeadSelfAttention(QKVAttention):
    """Multi-head self-attention (fused SDPA), optional qk-norm; records maps on request."""

    name = "mhsa"

    class Params(QKVAttention.Params):
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.attn_drop = params.attn_drop

    def forward(self, x: torch.Tensor, qk_transform: QKTransform | None = None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        if qk_transform is not None:
            q, k = qk_transform(q, k)
        return self.out(self.attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0))


COMPONENTS = (MultiHeadSelfAttention,)
