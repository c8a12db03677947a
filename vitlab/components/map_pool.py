"""Multihead attention pooling (MAP): learned latent queries attend over the tokens (SigLIP,
big_vision; timm ``global_pool='map'``, ``AttentionPoolLatent``)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..component import Pool
from ..context import BuildContext
from ..layers import ACTIVATIONS, Linear
from ..limits import LIMITS
from .mlp import Activation


class _PoolMlp(nn.Module):
    """fc1 -> act -> fc2 (timm ``Mlp`` inside ``AttentionPoolLatent``)."""

    def __init__(self, dim: int, hidden: int, act: str, **factory):
        super().__init__()
        self.fc1 = Linear(dim, hidden, **factory)
        self.act = ACTIVATIONS[act]()
        self.fc2 = Linear(hidden, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MapPool(Pool):
    """Attention pooling: latent queries attend over the tokens, then a residual MLP (timm 'map')."""

    name = "map"

    class Params(Pool.Params):
        num_heads: Optional[int] = Field(None, gt=0, le=LIMITS["embed_dim"], description="null = the model's num_heads")
        mlp_ratio: Optional[float] = Field(None, gt=0.0, description="null = the model's mlp_ratio")
        latent_len: int = Field(1, gt=0, le=LIMITS["reg_tokens"], description="number of latent queries")
        reduce: Literal["token", "avg"] = "token"  # first latent, or mean over latents
        qkv_bias: bool = True
        qk_norm: bool = False  # the recipe's norm over head_dim on queries and keys
        q_proj: bool = True  # project the latent to queries (false: the latent is the query)
        act: Activation = "gelu"  # activation of the pooling MLP
        include_prefix: bool = False  # also attend over class/register tokens (timm pool_include_prefix)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        heads = params.num_heads or ctx.num_heads
        if ctx.embed_dim % heads:
            raise ValueError(f"needs embed_dim {ctx.embed_dim} divisible by num_heads {heads}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, fk = ctx.embed_dim, ctx.factory_kwargs
        self.num_heads = params.num_heads or ctx.num_heads
        self.head_dim = D // self.num_heads
        self.skip = 0 if params.include_prefix else ctx.num_prefix_tokens
        self.reduce = params.reduce
        hidden = int(D * params.mlp_ratio) if params.mlp_ratio is not None else ctx.mlp_hidden_dim
        self.latent = nn.Parameter(torch.empty(1, params.latent_len, D, **fk))
        nn.init.trunc_normal_(self.latent, std=D**-0.5, a=-2 * D**-0.5, b=2 * D**-0.5)
        self.q = Linear(D, D, bias=params.qkv_bias, **fk) if params.q_proj else nn.Identity()
        self.kv = Linear(D, 2 * D, bias=params.qkv_bias, **fk)
        self.q_norm = ctx.make("norm", dim=self.head_dim) if params.qk_norm else nn.Identity()
        self.k_norm = ctx.make("norm", dim=self.head_dim) if params.qk_norm else nn.Identity()
        self.proj = Linear(D, D, **fk)
        self.norm = ctx.make("norm")
        self.mlp = _PoolMlp(D, hidden, params.act, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip:
            x = x[:, self.skip :]
        B, N, D = x.shape
        L = self.latent.shape[1]
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, h, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, hd)
        y = self.proj(y.transpose(1, 2).reshape(B, L, D))
        y = y + self.mlp(self.norm(y))  # (B, L, D)
        return y[:, 0] if self.reduce == "token" else y.mean(dim=1)


COMPONENTS = (MapPool,)
