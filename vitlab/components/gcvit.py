"""GCViT's pieces (Hatamizadeh et al. 2022, "Global Context Vision Transformers"; timm ``gcvit``),
each usable in any recipe.

GCViT attends inside non-overlapping windows. Every other block's queries are not computed from the
window but are one shared set, the stage's *global query*: the stage's input grid pooled down to one
window (a stack of fused MBConv blocks and max pools), the same for every window of the image. timm
computes it once per stage from the stage's input; vitlab carries it through the stage as extra
prefix tokens (w² of them, after any class / register tokens) that blocks leave as they are:

* ``gcvit_stem``: a 3x3 convolution of stride patch_size / 2, then GCViT's downsampler (a LayerNorm
  over the channels, a fused MBConv with squeeze-excitation, a 3x3 convolution of stride 2, a
  LayerNorm): timm's ``Stem``.
* ``gcvit_down``: the same downsampler between stages, to the stage's width (timm ``Downsample2d``).
  It drops the global query tokens of the stage it ends.
* ``gcvit``, the block: pre-norm with layer scale; with ``global_size`` it first pools its input
  grid into the stage's global query tokens (timm ``FeatureBlock``, its ``global_block``). Only
  patch tokens go through the norms, attention and MLP; the model's last block drops the global
  tokens, so the final norm and the pool see patches only.
* ``gcvit``, the attention: window attention with Swin's learned relative position table
  (timm ``WindowAttentionGlobal`` with ``RelPosBias``); ``global_query`` takes the queries from the
  global tokens instead of a projection (its ``qkv`` then gives keys and values only).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention, Block, PatchEmbed, Transition
from ..context import BuildContext
from ..errors import SpecError
from ..layers import Linear, drop_path, layer_scale
from ..limits import LIMITS
from ..state import ForwardState
from .pvt import conv_out, to_image, to_tokens
from .relpos import relative_position_index
from .window import partition, unpartition, window_slots

Eps = Field(1e-5, gt=0.0, lt=1.0, description="eps of its LayerNorms over the channels (timm: 1e-5)")


def se_width(channels: int) -> int:
    """timm's squeeze-excitation width at ratio 1/4: a multiple of 8, at least 8 (``make_divisible``)."""
    return max(8, int(channels * 0.25 + 4) // 8 * 8)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an image (B, C, H, W) (timm ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Channel gates from the mean over the image: 1x1 convs without bias, GELU, sigmoid (timm ``SEModule``)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        rd = se_width(channels)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=False, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))  # (B, C, 1, 1)
        return x * gate.sigmoid()


class MbConv(nn.Module):
    """x + pw(se(gelu(dw(x)))): a 3x3 depthwise conv, GELU, squeeze-excitation, a 1x1 conv, no
    biases, no norms (timm ``MbConvBlock``)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.conv_dw = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False, **fk)
        self.act = nn.GELU()
        self.se = SqueezeExcite(channels, **fk)
        self.conv_pw = nn.Conv2d(channels, channels, 1, bias=False, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_pw(self.se(self.act(self.conv_dw(x))))


class Downsample2d(nn.Module):
    """norm1 -> MBConv -> 3x3 conv of stride 2 without bias to ``dim_out`` -> norm2, on images (timm ``Downsample2d``)."""

    def __init__(self, dim: int, dim_out: int, eps: float, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.norm1 = LayerNorm2d(dim, eps=eps, **fk)
        self.conv_block = MbConv(dim, **fk)
        self.reduction = nn.Conv2d(dim, dim_out, 3, 2, 1, bias=False, **fk)
        self.norm2 = LayerNorm2d(dim_out, eps=eps, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.reduction(self.conv_block(self.norm1(x))))  # (B, dim_out, ceil(H / 2), ceil(W / 2))


def global_levels(grid: tuple[int, int], size: int) -> int:
    """The max pools (each halving the grid) from ``grid`` to the global query's ``size``: timm's
    ``int(log2(min(grid) / window))``."""
    return max(int(math.log2(min(grid) / size)), 0)


class GcvitStem(PatchEmbed):
    """A 3x3 convolution of stride patch_size / 2, then GCViT's downsampler (LayerNorm, MBConv, 3x3 convolution of stride 2, LayerNorm) at the embedding width (timm gcvit Stem)."""

    name = "gcvit_stem"

    class Params(PatchEmbed.Params):
        eps: float = Eps

    @classmethod
    def grid_size(cls, img_size, patch_size, params: Params):
        p = patch_size[0]
        if p != patch_size[1] or p % 2:
            raise ValueError(f"needs square patches of an even side (two stride-2 steps), got {patch_size[0]}x{patch_size[1]}")
        return conv_out(conv_out(img_size, 3, p // 2, 1), 3, 2, 1)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, D = ctx.factory_kwargs, ctx.embed_dim
        self.conv1 = nn.Conv2d(ctx.in_chans, D, 3, stride=ctx.patch_size[0] // 2, padding=1, **fk)
        self.down = Downsample2d(D, D, params.eps, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(self.down(self.conv1(x)))  # (B, gh * gw, D)


class GcvitDownsample(Transition):
    """GCViT's downsampler between stages (LayerNorm, MBConv, 3x3 convolution of stride 2 to the new width, LayerNorm; timm Downsample2d); drops the stage's global query tokens."""

    name = "gcvit_down"

    class Params(Transition.Params):
        eps: float = Eps

    @classmethod
    def out_grid(cls, grid, params: Params):
        return conv_out(grid, 3, 2, 1)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk = ctx.factory_kwargs
        self.num_prefix = ctx.num_prefix_tokens  # the spec's class / register tokens: kept
        self.down = Downsample2d(ctx.in_dim, ctx.embed_dim, params.eps, **fk)
        # prefix tokens (class, registers) get a linear map of their own, as PiT's and Swin's transitions
        self.fc = Linear(ctx.in_dim, ctx.embed_dim, **fk) if ctx.num_prefix_tokens else None

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}' (stage {state.stage_index})")
        state.check_tokens(x, f"transition '{self.name}'")
        patches = to_tokens(self.down(to_image(x[:, state.num_prefix:], grid)))
        x = torch.cat([self.fc(x[:, :self.num_prefix]), patches], dim=1) if self.fc is not None else patches
        return x, state.regrid(self.out_grid(grid, self.params), num_prefix=self.num_prefix)


class FeatureBlock(nn.Module):
    """The global query generator: ``levels`` x (MBConv, 3x3 max pool of stride 2), at least one MBConv (timm ``FeatureBlock``)."""

    def __init__(self, dim: int, levels: int, device=None, dtype=None):
        super().__init__()
        self.blocks = nn.Sequential()
        for i in range(max(levels, 1)):
            self.blocks.add_module(f"conv{i + 1}", MbConv(dim, device=device, dtype=dtype))
            if i < levels:
                self.blocks.add_module(f"pool{i + 1}", nn.MaxPool2d(3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class GcvitBlock(Block):
    """Pre-norm block over the patch tokens only, layer scale optional; with global_size it first pools its input grid into the stage's global query tokens (GCViT; timm GlobalContextVitBlock and its stage's global_block)."""

    name = "gcvit"

    class Params(Block.Params):
        init_values: Optional[float] = Field(None, gt=0.0, description="layer scale init; null = no layer scale")
        global_size: int = Field(0, ge=0, le=LIMITS["img_size"], description="> 0: this block opens its stage: its "
                                 "input grid, max-pooled log2(grid / global_size) times, becomes global_size² "
                                 "global query tokens (replacing any before); 0: none made here")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.num_prefix_tokens:  # its global query tokens are the only prefix it keeps count of
            raise ValueError("carries the stage's global query as prefix tokens: it takes no class or register "
                             "tokens (GCViT has none)")
        if params.global_size:
            pooled = ctx.grid_size
            for _ in range(global_levels(ctx.grid_size, params.global_size)):
                pooled = conv_out(pooled, 3, 2, 1)
            if pooled != (params.global_size,) * 2:
                raise ValueError(f"global_size {params.global_size}: the {ctx.grid_size[0]}x{ctx.grid_size[1]} grid of "
                                 f"stage {ctx.stage_index} pools to {pooled[0]}x{pooled[1]}, not a square of that side")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, fk = ctx.embed_dim, ctx.factory_kwargs
        self.num_prefix = ctx.num_prefix_tokens  # the spec's class / register tokens, before the global ones
        self.last = ctx.block_index == ctx.depth - 1  # drops the global tokens: the final norm sees patches only
        self.global_block = (FeatureBlock(D, global_levels(ctx.grid_size, params.global_size), **fk)
                             if params.global_size else None)
        self.norm1 = ctx.make("norm")
        self.attn = ctx.make("attention")
        self.ls1 = layer_scale(D, params.init_values, **fk)
        self.drop_path1 = drop_path(ctx.drop_path)
        self.norm2 = ctx.make("norm")
        self.mlp = ctx.make("mlp")
        self.ls2 = layer_scale(D, params.init_values, **fk)
        self.drop_path2 = drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"block 'gcvit' (block {state.block_index})")
        state.check_tokens(x, "block 'gcvit'")
        P = state.num_prefix
        if self.global_block is not None:  # (B, D, s, s) -> s² tokens after the spec's prefix
            g = to_tokens(self.global_block(to_image(x[:, P:], grid)))
            x = torch.cat([x[:, :self.num_prefix], g, x[:, P:]], dim=1)
            P = self.num_prefix + self.params.global_size ** 2  # plain ints: a trace's shapes would count arithmetic
            state = state.regrid(grid, num_prefix=P)
        prefix, patches = x[:, :P], x[:, P:]
        h = self.attn(torch.cat([prefix, self.norm1(patches)], dim=1), state)[:, P:]
        patches = patches + self.drop_path1(self.ls1(h))
        patches = patches + self.drop_path2(self.ls2(self.mlp(self.norm2(patches))))
        if self.last and P > self.num_prefix:
            return torch.cat([prefix[:, :self.num_prefix], patches], dim=1), state.regrid(grid, num_prefix=self.num_prefix)
        return torch.cat([prefix, patches], dim=1), state


class GcvitAttention(Attention):
    """Attention inside windows that divide the grid, with Swin's learned relative position table; global_query takes each window's queries from the stage's global tokens (GCViT; timm WindowAttentionGlobal). Prefix tokens are neither attended nor changed."""

    name = "gcvit"
    # its windows attend without RoPE or a position bias of the recipe's: its own table is the position
    takes_attn_bias = False
    takes_qk_transform = False

    class Params(Attention.Params):
        window_size: int = Field(7, gt=0, le=LIMITS["img_size"], description="window side in patches; it must divide the grid")
        global_query: StrictBool = Field(
            False, description="queries are the last window_size² prefix tokens (a gcvit block's global query), "
            "shared by every window; qkv projects keys and values only")
        qkv_bias: StrictBool = True
        proj_bias: StrictBool = True
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        w, (gh, gw) = params.window_size, ctx.grid_size
        if gh % w or gw % w:
            raise ValueError(f"window_size {w} does not divide stage {ctx.stage_index}'s {gh}x{gw} grid (gcvit does not pad)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, D, w = ctx.factory_kwargs, ctx.embed_dim, params.window_size
        self.num_heads, self.head_dim, self.window = ctx.num_heads, ctx.head_dim, w
        self.global_query = params.global_query
        self.attn_drop = params.attn_drop
        self.rel_pos = nn.Module()  # timm's RelPosBias: its table and index under ``rel_pos``
        self.rel_pos.relative_position_bias_table = nn.Parameter(torch.empty((2 * w - 1) ** 2, ctx.num_heads, **fk))
        nn.init.trunc_normal_(self.rel_pos.relative_position_bias_table, std=0.02)
        # not persistent: a function of the window, not a weight to save
        self.rel_pos.register_buffer("relative_position_index", relative_position_index((w, w), 0, device=ctx.device),
                                     persistent=False)
        self.qkv = Linear(D, (2 if params.global_query else 3) * D, bias=params.qkv_bias, **fk)
        self.proj = Linear(D, D, bias=params.proj_bias, **fk)
        self.proj_drop = nn.Dropout(ctx.proj_drop)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        grid = state.require_grid(f"gcvit attention (block {state.block_index})")
        state.check_tokens(x, "gcvit attention")
        B, _, D = x.shape
        P, w, H, hd = state.num_prefix, self.window, self.num_heads, self.head_dim
        n = w * w
        parts = self.qkv(x[:, P:]).reshape(B, -1, 2 if self.global_query else 3, H, hd).permute(2, 0, 3, 1, 4)
        kw, vw = (partition(t, grid, w) for t in parts.unbind(0)[-2:])  # (B, h, windows, w², hd)
        if self.global_query:
            if P < n:
                raise SpecError(f"gcvit attention with global_query (block {state.block_index}) needs {n} global query "
                                f"tokens from a gcvit block with global_size {w}, but there are {P} prefix tokens")
            q = x[:, P - n:P].reshape(B, n, H, hd).transpose(1, 2)[:, :, None]  # (B, h, 1, w², hd): every window's
            qw = q.expand(-1, -1, kw.shape[2], -1, -1)
        else:
            qw = partition(parts[0], grid, w)
        table = self.rel_pos.relative_position_bias_table[self.rel_pos.relative_position_index.view(-1)]
        bias = table.view(n, n, H).permute(2, 0, 1)[None, :, None]  # (1, h, 1, w², w²)
        out = self.attend(qw, kw, vw, dropout_p=self.attn_drop if self.training else 0.0, bias=bias)
        if self.record_maps:
            self.attn_map = self._full_map(self.attn_map, P, grid)
        out = unpartition(out, grid, w).transpose(1, 2).reshape(B, -1, D)  # (B, N, D)
        out = self.proj_drop(self.proj(out))
        return F.pad(out, (0, 0, P, 0)) if P else out  # prefix rows: nothing added to them

    def _full_map(self, window_map: torch.Tensor, P: int, grid: tuple[int, int]) -> torch.Tensor:
        """Window probabilities (B, h, windows, w², w²) -> (B, h, P + N, P + N) on the grid, zero
        outside each window and on the prefix rows (a global query's row sits at its window slot)."""
        B, H = window_map.shape[:2]
        slots = window_slots(grid, grid, self.window, device=window_map.device) + P  # (windows, w²)
        full = window_map.new_zeros(B, H, P + grid[0] * grid[1], P + grid[0] * grid[1])
        rows = slots[:, :, None].expand(-1, -1, slots.shape[1])
        full[:, :, rows, slots[:, None, :].expand_as(rows)] = window_map
        return full

    def extra_repr(self) -> str:
        return f"window_size={self.window}" + (", global_query" if self.global_query else "")


COMPONENTS = (GcvitStem, GcvitDownsample, GcvitBlock, GcvitAttention)
