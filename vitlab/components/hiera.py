"""Hiera (Ryali et al. 2023; timm ``hiera``) and SAM 2's Hiera (timm ``hieradet_sam2``): the parts a
plain staged ViT lacks.

timm's Hiera keeps its tokens "unrolled" (``Unroll``): reordered so that each q_stride group of
neighbours, and each mask unit, is contiguous in memory, which makes q-pooling a ``max`` over one
dimension and mask-unit attention a reshape. Nothing else depends on the order: attention inside a
mask unit is the same set of tokens whatever their order, the MLP and norms act per token, the
position table is added before the unroll, and the final average does not care. vitlab therefore
keeps its tokens in raster order on the patch grid, as every other component expects, and
computes the same things spatially:

* mask-unit attention is ``window`` attention (a window of the mask unit's side at the current grid,
  no shift, no bias), global attention is ``mhsa``;
* ``q_pool``, the block opening each later stage, pools queries and the projected residual with a
  ``stride x stride`` max pool on the grid (timm's max over the unrolled q_stride group);
* the patch embedding is ``conv_padded`` (kernel 7, stride 4, padding 3; shared with MViTv2);
* ``abswin`` is the absolute-window position embedding (a global table resampled to the grid plus
  a mask-unit table tiled over it) of Hiera's abswin models and of SAM 2.

The counted operators are timm's (the permutations of the unroll are free), so FLOPs equal fvcore's
on timm's model.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import PosEncoding, Transition
from ..context import BuildContext
from ..layers import Linear, drop_path, layer_scale
from ..limits import LIMITS
from ..sizes import as_pair
from ..state import ForwardState
from .window import partition, unpartition


def pool_grid(x: torch.Tensor, grid: tuple[int, int], stride: int, mode: str = "max") -> torch.Tensor:
    """(..., gh * gw, C) tokens on ``grid`` -> (..., (gh // s) * (gw // s), C): each ``s x s``
    group pooled (max, or mean with ``mode="avg"``); rows and columns past whole groups dropped (as
    timm's ``MaxPool2d``)."""
    if stride == 1:
        return x
    lead, (gh, gw), C = x.shape[:-2], grid, x.shape[-1]
    img = x.reshape(-1, gh, gw, C).permute(0, 3, 1, 2)  # (B', C, gh, gw)
    pool = F.max_pool2d if mode == "max" else F.avg_pool2d
    out = pool(img, stride, stride)  # (B', C, gh // s, gw // s)
    return out.flatten(2).transpose(1, 2).reshape(*lead, -1, C)


class AbsWinPosEmbed(PosEncoding):
    """Absolute-window position embedding: a learned global table resampled (bicubic) to the grid
    plus a learned window table tiled over it (Bolya et al. 2023, "Window Attention is Bugged";
    Hiera's abswin models, SAM 2). Patches only: prefix tokens get no position."""

    name = "abswin"

    class Params(PosEncoding.Params):
        global_size: Union[int, tuple[int, int]] = Field(14, description="side(s) of the global table, resampled to the grid")
        window_size: int = Field(8, gt=0, le=LIMITS["img_size"], description="side of the window table, tiled over the grid")
        antialias: StrictBool = Field(True, description="antialiased resampling (Hiera: true, SAM 2: false)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, D, w = ctx.factory_kwargs, ctx.embed_dim, params.window_size
        self.antialias = params.antialias
        self.weight = nn.Parameter(torch.empty(1, D, *as_pair(params.global_size), **fk))  # (1, D, h, w) as timm
        self.window = nn.Parameter(torch.empty(1, D, w, w, **fk))
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.trunc_normal_(self.window, std=0.02)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        gh, gw = state.require_grid(f"pos_embed '{self.name}'")
        w, P = self.window.shape[-1], state.num_prefix
        pe = F.interpolate(self.weight, size=(gh, gw), mode="bicubic", antialias=self.antialias)
        # timm's grids are whole windows; another grid takes the tiling's top-left part
        pe = pe + self.window.tile(-(-gh // w), -(-gw // w))[..., :gh, :gw]  # (1, D, gh, gw)
        pe = pe.flatten(2).transpose(1, 2)  # (1, N, D): patches only, prefix tokens get none
        return torch.cat([x[:, :P], x[:, P:] + pe], dim=1) if P else x + pe


class _PooledAttention(nn.Module):
    """Attention from ``dim_in`` to ``dim`` whose queries are max-pooled ``stride x stride`` on the
    grid: inside ``window``-side windows of the padded grid (mask units), or over the whole grid
    (``window`` 0). (B, gh * gw, dim_in) -> (B, (gh // s) * (gw // s), dim)."""

    def __init__(self, dim_in: int, dim: int, heads: int, stride: int, window: int, **fk):
        super().__init__()
        self.heads, self.head_dim, self.stride, self.window = heads, dim // heads, stride, window
        self.qkv = Linear(dim_in, 3 * dim, **fk)
        self.proj = Linear(dim, dim, **fk)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        s, w, (gh, gw) = self.stride, self.window, grid
        out_grid = (gh // s, gw // s)
        if w:  # SAM 2 pads the normed tokens to whole windows (Hiera's grids always divide)
            padded = (-(-gh // w) * w, -(-gw // w) * w)
            if padded != (gh, gw):
                x = F.pad(x.reshape(B, gh, gw, -1), (0, 0, 0, padded[1] - gw, 0, padded[0] - gh)).flatten(1, 2)
        qkv = self.qkv(x).reshape(B, x.shape[1], 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, hd)
        if w:
            q, k, v = (partition(t, padded, w) for t in (q, k, v))  # (B, h, windows, w², hd)
            q = pool_grid(q, (w, w), s)  # (B, h, windows, (w / s)², hd)
            out = unpartition(F.scaled_dot_product_attention(q, k, v), (padded[0] // s, padded[1] // s), w // s)
        else:
            out = F.scaled_dot_product_attention(pool_grid(q, grid, s), k, v)  # (B, h, N / s², hd)
        out = self.proj(out.transpose(1, 2).reshape(B, out.shape[2], -1))  # SAM 2 projects the pads too
        if w and padded != (gh, gw):  # (B, padded N / s², dim) -> the pooled real grid
            out = out.reshape(B, padded[0] // s, padded[1] // s, -1)[:, : out_grid[0], : out_grid[1]].flatten(1, 2)
        return out


class QueryPooling(Transition):
    """Hiera's stage-opening block: pre-norm, its attention's queries and its residual max-pooled
    ``stride x stride`` on the grid, so the grid shrinks and the width grows (Ryali et al. 2023;
    timm ``HieraBlock`` and SAM 2's ``MultiScaleBlock`` with a q_stride).

    x' = pool(proj(norm1(x))) + attn(norm1(x)), then x' + mlp(norm2(x')); the attention's keys and
    values are the tokens received, in windows (mask units) or global. With ``residual: pool``
    (Hiera's ``use_expand_proj=False``) the residual is the max- and average-pooled tokens side by
    side, twice the width. Stochastic depth is not applied here (the blocks' rates are spread over
    the model's blocks)."""

    name = "q_pool"

    class Params(Transition.Params):
        stride: int = Field(2, gt=0, le=LIMITS["img_size"], description="query pooling stride per side (timm q_stride)")
        window_size: int = Field(0, ge=0, le=LIMITS["img_size"], description=(
            "side in patches of the windows (mask units) keys and values are taken from, on the grid received; "
            "0 = global attention"))
        residual: Literal["proj", "pool"] = Field("proj", description=(
            "proj: the normed tokens projected to the new width, then pooled; pool: max- and average-pooled "
            "tokens concatenated (the width doubles; Hiera abswin's use_expand_proj=False)"))
        init_values: Optional[float] = Field(None, gt=0.0, description="layer scale init; null = no layer scale")

    @classmethod
    def out_grid(cls, grid, params: Params):
        return tuple(g // params.stride for g in grid)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.num_prefix_tokens:
            raise ValueError("has no place for prefix tokens: set class_token: false and reg_tokens: 0")
        if params.window_size % params.stride:
            raise ValueError(f"needs window_size {params.window_size} to be a multiple of stride {params.stride}")
        if params.residual == "pool" and ctx.embed_dim != 2 * ctx.in_dim:
            raise ValueError(f"residual: pool doubles the width, but stage {ctx.stage_index} has embed_dim "
                             f"{ctx.embed_dim} after {ctx.in_dim}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, D_in, D = ctx.factory_kwargs, ctx.in_dim, ctx.embed_dim
        self.stride, self.residual = params.stride, params.residual
        self.norm1 = ctx.make("norm", dim=D_in)
        # the same width keeps the tokens themselves (pooled) as the residual
        self.proj = Linear(D_in, D, **fk) if params.residual == "proj" and D_in != D else None
        self.attn = _PooledAttention(D_in, D, ctx.num_heads, params.stride, params.window_size, **fk)
        self.ls1 = layer_scale(D, params.init_values, **fk)
        self.drop_path1 = drop_path(ctx.drop_path)
        self.norm2 = ctx.make("norm")
        self.mlp = ctx.make("mlp")
        self.ls2 = layer_scale(D, params.init_values, **fk)
        self.drop_path2 = drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}' (stage {state.stage_index})")
        state.check_tokens(x, f"transition '{self.name}'")
        s = self.stride
        h = self.norm1(x)
        if self.residual == "pool":
            shortcut = torch.cat([pool_grid(x, grid, s), pool_grid(x, grid, s, "avg")], dim=-1)  # (B, N', 2 D_in)
        else:
            shortcut = pool_grid(x if self.proj is None else self.proj(h), grid, s)  # (B, N', D)
        x = shortcut + self.drop_path1(self.ls1(self.attn(h, grid)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, state.regrid(self.out_grid(grid, self.params))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, window_size={self.attn.window}"


COMPONENTS = (AbsWinPosEmbed, QueryPooling)
