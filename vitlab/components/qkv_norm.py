"""Multi-head self-attention with queries, keys and values normed per head (Gemma 4's vision
attention): separate bias-free q / k / v / o projections (optionally clamped), the recipe's norm
on queries and keys, an RMS norm without weights on values, and a logit scale of 1 by default
(normed queries and keys need no 1 / sqrt(head_dim)). timm's and HF's parameter names."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention
from ..context import BuildContext
from ..state import ForwardState
from .attention import check_kv_heads
from .clamped import ClampedLinear


class QKVNormAttention(Attention):
    """Multi-head self-attention with normed queries, keys and values and separate projections (Gemma 4)."""

    name = "mhsa_qkvnorm"

    class Params(Attention.Params):
        v_norm: StrictBool = True  # RMS-norm each value head, without weights (HF omits its gain)
        eps: float = Field(1e-6, gt=0.0, description="eps of the value norm")
        scale: Optional[float] = Field(1.0, gt=0.0, description="attention logit scale; null = head_dim ** -0.5")
        kv_heads: Optional[int] = Field(
            None, gt=0, description="key/value heads shared by groups of query heads (GQA; 1 = MQA); null = num_heads")
        clamp: StrictBool = False  # clamp each projection's input and output (Gemma 4 E2B/E4B)
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        check_kv_heads(ctx, params.kv_heads)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, hd, fk = ctx.embed_dim, ctx.head_dim, ctx.factory_kwargs
        self.num_heads, self.head_dim = ctx.num_heads, hd
        self.kv_heads = params.kv_heads or ctx.num_heads
        self.q_proj = ClampedLinear(D, self.num_heads * hd, params.clamp, **fk)
        self.k_proj = ClampedLinear(D, self.kv_heads * hd, params.clamp, **fk)
        self.v_proj = ClampedLinear(D, self.kv_heads * hd, params.clamp, **fk)
        self.o_proj = ClampedLinear(D, D, params.clamp, **fk)
        self.q_norm = ctx.make("norm", dim=hd)
        self.k_norm = ctx.make("norm", dim=hd)
        # ``attend`` scales by head_dim ** -0.5; queries pre-scaled by this factor give ``scale``
        self.q_scale = None if params.scale is None else params.scale * hd ** 0.5
        self.proj_drop = nn.Dropout(ctx.proj_drop)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        B, N, _ = x.shape
        hd, p = self.head_dim, self.params
        q = self.q_norm(self.q_proj(x).view(B, N, self.num_heads, hd))  # (B, N, heads, hd)
        k = self.k_norm(self.k_proj(x).view(B, N, self.kv_heads, hd))  # (B, N, kv_heads, hd)
        v = self.v_proj(x).view(B, N, self.kv_heads, hd)
        if p.v_norm:
            v = F.rms_norm(v, (hd,), eps=p.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads | kv_heads, N, hd)
        q, k = state.transform_qk(q, k)
        if self.q_scale is not None:
            q = q * self.q_scale
        drop = p.attn_drop if self.training else 0.0
        out = self.attend(q, k, v, dropout_p=drop, bias=state.attn_bias)  # (B, heads, N, hd)
        return self.proj_drop(self.o_proj(out.transpose(1, 2).reshape(B, N, -1)))


COMPONENTS = (QKVNormAttention,)
