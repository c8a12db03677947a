"""PVTv2's pieces (Wang et al. 2022; timm ``pvt_v2``), each usable in any recipe:

* ``overlap``: a patch embedding whose convolution overlaps (kernel ``patch_size``, a smaller
  ``stride``, padding kernel // 2), then a LayerNorm of its own (timm's ``OverlapPatchEmbed``;
  with stride = kernel and no padding also Twins' ``PatchEmbed``).
* ``conv_embed``: the same between stages as a ``transition``, optionally after a norm over the
  tokens it receives (PVTv2's norm at the end of each stage, ``stages.{i}.norm``).
* ``sra``: spatial-reduction attention: queries from every token, keys and values from the grid
  reduced by a strided convolution and a norm (``sr_ratio``), or, ``linear``, average-pooled to a
  fixed size, a 1x1 convolution, a norm and GELU (PVTv2-li). Twins' global sub-sampled attention
  is the same layer.
* ``conv_mlp``: fc1 -> depthwise 3x3 convolution on the grid -> activation -> fc2 (timm's
  ``MlpWithDepthwiseConv``); it needs the grid, so it runs in ``prenorm_grid`` blocks, which hand
  their MLP the forward state.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention, PatchEmbed, Transition
from ..context import BuildContext
from ..errors import SpecError
from ..layers import Linear
from ..limits import LIMITS
from ..state import ForwardState
from .block import PreNormBlock
from .mlp import FeedForward

Eps = Field(1e-5, gt=0.0, lt=1.0, description="eps of the LayerNorm of its own (timm's nn.LayerNorm: 1e-5)")


def conv_out(grid, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The grid a convolution of ``kernel``, ``stride`` and ``padding`` gives on ``grid``."""
    return tuple((g + 2 * padding - kernel) // stride + 1 for g in grid)


def to_image(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, gh * gw, D) patch tokens -> (B, D, gh, gw)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, D, gh, gw) -> (B, gh * gw, D)."""
    return x.flatten(2).transpose(1, 2)


class OverlapPatchEmbed(PatchEmbed):
    """A convolution of kernel patch_size, a stride and padding kernel // 2 (overlapping patches), then a LayerNorm of its own (PVTv2)."""

    name = "overlap"

    class Params(PatchEmbed.Params):
        stride: Optional[int] = Field(None, gt=0, le=LIMITS["img_size"], description="step in pixels; null = the patch size")
        padding: Optional[int] = Field(None, ge=0, le=LIMITS["img_size"], description="zero padding in pixels; null = patch_size // 2")
        bias: StrictBool = True
        eps: float = Eps

    @staticmethod
    def geometry(patch_size: tuple[int, int], params: Params) -> tuple[int, int, int]:
        k = patch_size[0]
        return k, params.stride or k, k // 2 if params.padding is None else params.padding

    @classmethod
    def grid_size(cls, img_size, patch_size, params: Params):
        if patch_size[0] != patch_size[1]:
            raise ValueError(f"needs square patches, got {patch_size[0]}x{patch_size[1]}")
        grid = conv_out(img_size, *cls.geometry(patch_size, params))
        if min(grid) < 1:
            raise ValueError(f"image size {img_size[0]}x{img_size[1]} gives no patches")
        return grid

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        k, s, p = self.geometry(ctx.patch_size, params)
        self.proj = nn.Conv2d(ctx.in_chans, ctx.embed_dim, k, stride=s, padding=p, bias=params.bias,
                              **ctx.factory_kwargs)
        self.norm = nn.LayerNorm(ctx.embed_dim, eps=params.eps, **ctx.factory_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_tokens(self.proj(x)))  # (B, gh * gw, D)


class ConvEmbedTransition(Transition):
    """Between stages: an optional norm over the tokens received, a strided convolution of the grid to the new width, then a LayerNorm of its own (PVTv2, Twins)."""

    name = "conv_embed"

    class Params(Transition.Params):
        kernel_size: int = Field(3, gt=0, le=LIMITS["img_size"], description="side of the convolution (PVTv2: 3, Twins: 2)")
        stride: int = Field(2, gt=0, le=LIMITS["img_size"], description="grid stride")
        padding: Optional[int] = Field(None, ge=0, le=LIMITS["img_size"], description="null = kernel_size // 2")
        in_norm: StrictBool = Field(False, description="the recipe's norm over the tokens received first (PVTv2's "
                                    "norm at the end of each stage)")
        eps: float = Eps

    @staticmethod
    def geometry(params: Params) -> tuple[int, int, int]:
        k = params.kernel_size
        return k, params.stride, k // 2 if params.padding is None else params.padding

    @classmethod
    def out_grid(cls, grid, params: Params):
        return conv_out(grid, *cls.geometry(params))

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        k, s, p = self.geometry(params)
        fk = ctx.factory_kwargs
        self.in_norm = ctx.make("norm", dim=ctx.in_dim) if params.in_norm else nn.Identity()
        self.proj = nn.Conv2d(ctx.in_dim, ctx.embed_dim, k, stride=s, padding=p, **fk)
        self.norm = nn.LayerNorm(ctx.embed_dim, eps=params.eps, **fk)
        # prefix tokens (class, registers) get a linear map of their own, as PiT's and Swin's transitions
        self.fc = Linear(ctx.in_dim, ctx.embed_dim, **fk) if ctx.num_prefix_tokens else None

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}' (stage {state.stage_index})")
        state.check_tokens(x, f"transition '{self.name}'")
        x = self.in_norm(x)
        P = state.num_prefix
        image = self.proj(to_image(x[:, P:], grid))  # (B, D_out, gh', gw')
        patches = self.norm(to_tokens(image))
        out = torch.cat([self.fc(x[:, :P]), patches], dim=1) if self.fc is not None else patches
        return out, state.regrid(tuple(image.shape[-2:]))


class SpatialReductionAttention(Attention):
    """Attention whose keys and values come from the patch grid reduced by a strided convolution and a norm, or pooled to a fixed size (PVTv2's spatial-reduction attention, Twins' global sub-sampled attention)."""

    name = "sra"
    # queries and keys are on different grids: no shared (N x N) bias, no q/k transform
    takes_attn_bias = False
    takes_qk_transform = False  # keys on a reduced grid: no RoPE over them
    has_maps = False  # its probabilities are (N x reduced N): no square map over tokens

    class Params(Attention.Params):
        sr_ratio: int = Field(1, gt=0, le=LIMITS["img_size"], description="kernel and stride of the reducing "
                              "convolution; 1 = no reduction (plain attention)")
        linear: StrictBool = Field(False, description="PVTv2-li: average-pool the grid to pool_size, then a 1x1 "
                                   "convolution, the norm and GELU (sr_ratio unused)")
        pool_size: int = Field(7, gt=0, le=LIMITS["img_size"], description="side of the pooled grid when linear")
        qkv_bias: StrictBool = True
        proj_bias: StrictBool = True
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)
        eps: float = Eps

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, fk = ctx.embed_dim, ctx.factory_kwargs
        self.num_heads, self.head_dim, self.attn_drop = ctx.num_heads, ctx.head_dim, params.attn_drop
        self.q = Linear(D, D, bias=params.qkv_bias, **fk)  # timm's names: q, kv, sr, norm, proj
        self.kv = Linear(D, 2 * D, bias=params.qkv_bias, **fk)
        self.pool = nn.AdaptiveAvgPool2d(params.pool_size) if params.linear else None
        reduces = params.linear or params.sr_ratio > 1
        r = 1 if params.linear else params.sr_ratio
        self.sr = nn.Conv2d(D, D, kernel_size=r, stride=r, **fk) if reduces else None
        self.norm = nn.LayerNorm(D, eps=params.eps, **fk) if reduces else None
        self.act = nn.GELU() if params.linear else None
        self.proj = Linear(D, D, bias=params.proj_bias, **fk)
        self.proj_drop = nn.Dropout(ctx.proj_drop)

    def reduced(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """(B, P + N, D) -> the tokens keys and values come from, (B, P + M, D): the prefix, then
        the reduced grid."""
        if self.sr is None:
            return x
        grid = state.require_grid(f"attention '{self.name}' (block {state.block_index})")
        P = state.num_prefix
        image = to_image(x[:, P:], grid)  # (B, D, gh, gw)
        if self.pool is not None:
            image = self.pool(image)
        patches = self.norm(to_tokens(self.sr(image)))  # (B, M, D)
        if self.act is not None:
            patches = self.act(patches)
        return torch.cat([x[:, :P], patches], dim=1)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if state.qk_transform is not None or state.attn_bias is not None:
            raise SpecError(f"attention '{self.name}' (block {state.block_index}) takes no position transform or "
                            "bias inside attention: its keys are on a reduced grid; use a position encoding added "
                            "to the tokens")
        state.check_tokens(x, f"attention '{self.name}'")
        B, N, D = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, h, hd).transpose(1, 2)  # (B, h, N, hd)
        kv = self.kv(self.reduced(x, state))
        k, v = kv.reshape(B, -1, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, P + M, hd) each
        out = self.attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)  # (B, h, N, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))


class ConvMlp(FeedForward):
    """fc1, a depthwise convolution of the hidden features on the patch grid, the activation, fc2 (PVTv2's MLP; needs a ``prenorm_grid`` block)."""

    name = "conv_mlp"
    takes_state = True  # called as mlp(x, state) by blocks that hand it (``prenorm_grid``, ``prenorm_cpe``)

    class Params(FeedForward.Params):
        kernel_size: int = Field(3, gt=0, le=LIMITS["img_size"], description="odd side of the depthwise convolution")
        extra_relu: StrictBool = Field(False, description="a ReLU before the convolution (PVTv2-li)")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.kernel_size % 2 == 0:
            raise ValueError(f"needs an odd kernel_size (the grid keeps its size), got {params.kernel_size}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        hidden, k = ctx.mlp_hidden_dim, params.kernel_size
        self.relu = nn.ReLU() if params.extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden, **ctx.factory_kwargs)

    def forward(self, x: torch.Tensor, state: ForwardState | None = None) -> torch.Tensor:
        if state is None:
            raise SpecError(f"mlp '{self.name}' needs the patch grid: use it in a 'prenorm_grid' block, which "
                            "hands its MLP the forward state")
        grid = state.require_grid(f"mlp '{self.name}' (block {state.block_index})")
        P = state.num_prefix
        h = self.fc1(x)  # (B, P + N, hidden)
        image = self.dwconv(self.relu(to_image(h[:, P:], grid)))  # prefix tokens skip the convolution
        h = torch.cat([h[:, :P], to_tokens(image)], dim=1)
        return self._out(self.act(h))


class GridPreNormBlock(PreNormBlock):
    """Pre-norm block whose MLP also receives the forward state (the patch grid PVTv2's conv MLP needs)."""

    name = "prenorm_grid"
    gives_mlp_state = True

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), state)))
        h = self.norm2(x)
        h = self.mlp(h, state) if self.mlp.takes_state else self.mlp(h)
        return x + self.drop_path2(self.ls2(h))


COMPONENTS = (OverlapPatchEmbed, ConvEmbedTransition, SpatialReductionAttention, ConvMlp, GridPreNormBlock)
