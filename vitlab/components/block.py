"""Block orderings: where the norms and the two residual branches (attention, MLP) go.

Every block adds both branches to the residual stream; ``tests/test_blocks.py`` proves it.
``parallel_branches`` runs several attention branches side by side, then several MLP branches.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field, StrictBool
from torch import nn

from ..component import Block
from ..state import ForwardState
from ..context import BuildContext
from ..layers import drop_path, layer_scale


class TwoBranchBlock(Block):
    """Builds norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2 (timm's names)."""

    class Params(Block.Params):
        init_values: Optional[float] = Field(None, gt=0.0, description="layer scale init; null = no layer scale")

    def __init__(self, ctx: BuildContext, params: Params, shared_norm: bool = False):
        super().__init__(ctx, params)
        D, fk = ctx.embed_dim, ctx.factory_kwargs
        self.norm1 = ctx.make("norm")
        self.attn = ctx.make("attention")
        self.ls1 = layer_scale(D, params.init_values, **fk)
        self.drop_path1 = drop_path(ctx.drop_path)
        if not shared_norm:
            self.norm2 = ctx.make("norm")
        self.mlp = ctx.make("mlp")
        self.ls2 = layer_scale(D, params.init_values, **fk)
        self.drop_path2 = drop_path(ctx.drop_path)


class PreNormBlock(TwoBranchBlock):
    """Pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)) (ViT, timm ``Block``)."""

    name = "prenorm"

    class Params(TwoBranchBlock.Params):
        attn_only_layer_scale: StrictBool = Field(
            False, description="layer scale on the attention branch only (Sapiens2; timm Eva's attn_only_layer_scale)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        if params.attn_only_layer_scale:
            self.ls2 = nn.Identity()

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), state)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PostNormBlock(TwoBranchBlock):
    """Post-norm: norm1(x + attn(x)), then norm2(x + mlp(x)) (the original Transformer)."""

    name = "postnorm"

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, state))))
        x = self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
        return x


class ResPostNormBlock(TwoBranchBlock):
    """Res-post-norm: x + norm1(attn(x)), then x + norm2(mlp(x)) (Swin V2, timm ``ResPostBlock``)."""

    name = "respostnorm"

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.norm1(self.attn(x, state))))
        x = x + self.drop_path2(self.ls2(self.norm2(self.mlp(x))))
        return x


class ParallelBlock(TwoBranchBlock):
    """Parallel: x + attn(norm(x)) + mlp(norm(x)) with one shared norm (ViT-22B, GPT-J).

    ``shared_layer_scale``: one layer scale (``ls1``) and one stochastic depth over the branches'
    sum, x + ls1(attn(h) + mlp(h)), as timm's ``ParallelScalingBlock`` (its ``ls``)."""

    name = "parallel"

    class Params(TwoBranchBlock.Params):
        shared_norm: StrictBool = True  # false: separate norm1 / norm2 for the two branches
        shared_layer_scale: StrictBool = Field(
            False, description="one layer scale over the sum of both branches (timm's ParallelScalingBlock)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params, shared_norm=params.shared_norm)
        self.shared_norm = params.shared_norm
        self.shared_layer_scale = params.shared_layer_scale
        if params.shared_layer_scale:
            self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        h = self.norm1(x)
        m = h if self.shared_norm else self.norm2(x)
        if self.shared_layer_scale:
            return x + self.drop_path1(self.ls1(self.attn(h, state) + self.mlp(m)))
        return x + self.drop_path1(self.ls1(self.attn(h, state))) + self.drop_path2(self.ls2(self.mlp(m)))


class _Branch(nn.Module):
    """One residual branch of ``parallel_branches``: norm -> attention or MLP -> layer scale ->
    drop path, under timm's names (``norm``, ``attn`` / ``mlp``, ``ls``, ``drop_path``)."""

    def __init__(self, ctx: BuildContext, kind: str, init_values: float | None):
        super().__init__()
        self.mixes_tokens = kind == "attention"
        self.norm = ctx.make("norm")
        setattr(self, "attn" if self.mixes_tokens else "mlp", ctx.make(kind))
        self.ls = layer_scale(ctx.embed_dim, init_values, **ctx.factory_kwargs)
        self.drop_path = drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        h = self.norm(x)
        h = self.attn(h, state) if self.mixes_tokens else self.mlp(h)
        return self.drop_path(self.ls(h))


class ParallelBranchesBlock(Block):
    """Pre-norm with parallel branches: x + Σ_j attn_j(norm_j(x)), then x + Σ_j mlp_j(norm_j(x)),
    each branch with its own weights (Touvron et al. 2022, "Three things everyone should know
    about Vision Transformers"; timm ``ParallelThingsBlock``, its ``attns.j`` / ``ffns.j`` names).

    ``attn`` and ``mlp`` name the first branch's, as in a single-branch block."""

    name = "parallel_branches"

    class Params(Block.Params):
        branches: int = Field(2, ge=1, le=64, description="attention (and MLP) branches side by side")
        init_values: Optional[float] = Field(None, gt=0.0, description="layer scale init; null = no layer scale")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.attns = nn.ModuleList(_Branch(ctx, "attention", params.init_values) for _ in range(params.branches))
        self.ffns = nn.ModuleList(_Branch(ctx, "mlp", params.init_values) for _ in range(params.branches))

    @property
    def attn(self) -> nn.Module:
        return self.attns[0].attn

    @property
    def mlp(self) -> nn.Module:
        return self.ffns[0].mlp

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = x + sum(branch(x, state) for branch in self.attns)
        return x + sum(branch(x, state) for branch in self.ffns)


COMPONENTS = (PreNormBlock, PostNormBlock, ResPostNormBlock, ParallelBlock, ParallelBranchesBlock)
