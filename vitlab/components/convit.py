"""Gated positional self-attention (GPSA; ConViT, d'Ascoli et al. 2021; timm ``convit.GPSA``).

Each head mixes two attentions with a learned gate, ``(1 - σ(g)) · softmax(q kᵀ / √d) + σ(g) ·
softmax(pos)``: the usual content attention, and a positional one whose logits are a linear map
(``pos_proj``, 3 -> heads) of each patch pair's offset ``(dx, dy, dx² + dy²)``, key minus query.
Initialised as ConViT does (``locality_strength``), each head's positional attention starts
peaked on one neighbour of a small grid around the query, as a convolution would.

ConViT runs GPSA on the patches only and adds its class token after the GPSA blocks (a staged
recipe: stage 2 starts with the ``class_token`` transition). With prefix tokens GPSA still works:
they take no part in the positional attention, and a prefix query's attention is its content
attention alone (the mix renormalised, as timm does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention
from ..context import BuildContext
from ..layers import Linear
from ..state import ForwardState


def patch_offsets(grid: tuple[int, int], device=None, dtype=None) -> torch.Tensor:
    """Every (query, key) pair of patches on ``grid``, row-major: (N, N, 3) of ``(dx, dy, dx² + dy²)``,
    key minus query (timm's ``GPSA.get_rel_indices``, which assumes a square grid)."""
    gh, gw = grid
    rows = torch.arange(gh, device=device).repeat_interleave(gw)  # (N,) row of each patch
    cols = torch.arange(gw, device=device).repeat(gh)
    dx, dy = cols[None, :] - cols[:, None], rows[None, :] - rows[:, None]  # (N, N)
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1).to(dtype or torch.float32)


class GatedPositionalAttention(Attention):
    """ConViT's gated positional self-attention: content and positional attention mixed per head."""

    name = "gpsa"

    class Params(Attention.Params):
        qkv_bias: StrictBool = False  # ConViT's default
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)
        locality_strength: float = Field(
            1.0, gt=0.0, description="initial sharpness of the positional attention (ConViT's local init)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, fk = ctx.embed_dim, ctx.factory_kwargs
        self.num_heads, self.head_dim = ctx.num_heads, ctx.head_dim
        self.scale = self.head_dim ** -0.5
        self.attn_drop = params.attn_drop
        # timm's names and layout: queries and keys in one projection, values in another
        self.qk = Linear(D, 2 * D, bias=params.qkv_bias, **fk)
        self.v = Linear(D, D, bias=params.qkv_bias, **fk)
        self.proj = Linear(D, D, **fk)
        self.proj_drop = nn.Dropout(ctx.proj_drop)
        self.pos_proj = Linear(3, self.num_heads, **fk)
        self.gating_param = nn.Parameter(torch.ones(self.num_heads, **fk))  # σ(1): mostly positional at first
        self.grid = tuple(ctx.grid_size)
        # Not persistent: a function of the build-time grid, not a weight to save.
        self.register_buffer("offsets", patch_offsets(self.grid, ctx.device, ctx.dtype), persistent=False)
        self._local_init(params.locality_strength)

    @torch.no_grad()
    def _local_init(self, strength: float) -> None:
        """ConViT's init: values pass through (identity ``v``), and head ``h1 + k · h2`` of the
        first k² (k = ⌊√heads⌋) attends around offset ``(h2 - c, h1 - c)`` from the query."""
        self.v.weight.copy_(torch.eye(self.v.weight.shape[0], device=self.v.weight.device, dtype=self.v.weight.dtype))
        w = self.pos_proj.weight  # (heads, 3): logits -|d|² + 2 (dx, dy)·centre, a peak at the centre
        k = int(self.num_heads ** 0.5)
        center = (k - 1) / 2 if k % 2 == 0 else k // 2
        for h1 in range(k):
            for h2 in range(k):
                head = h1 + k * h2
                w[head, 2] = -1
                w[head, 1] = 2 * (h1 - center)
                w[head, 0] = 2 * (h2 - center)
        w.mul_(strength)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        state.require_grid(f"attention '{self.name}' (block {state.block_index}, positional attention)")
        B, T, D = x.shape
        P, h, hd = state.num_prefix, self.num_heads, self.head_dim
        q, k = self.qk(x).reshape(B, T, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, T, hd) each
        q, k = state.transform_qk(q, k)
        v = self.v(x).reshape(B, T, h, hd).transpose(1, 2)  # (B, h, T, hd)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, T, T)
        if state.attn_bias is not None:
            logits = logits + state.attn_bias
        offsets = self.offsets if tuple(state.grid) == self.grid else patch_offsets(state.grid, x.device, x.dtype)
        positional = self.pos_proj(offsets).permute(2, 0, 1).softmax(dim=-1)  # (h, N, N)
        if P:  # prefix tokens: no positional attention to or from them
            positional = F.pad(positional, (P, 0, P, 0))
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        attn = (1.0 - gate) * logits.softmax(dim=-1) + gate * positional
        attn = attn / attn.sum(dim=-1, keepdim=True)  # rows of prefix queries sum to 1 - σ(g) before
        if self.record_maps:
            self.attn_map = attn.detach()
        if self.training and self.attn_drop:
            attn = F.dropout(attn, p=self.attn_drop)
        out = (attn @ v).transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}"


COMPONENTS = (GatedPositionalAttention,)
