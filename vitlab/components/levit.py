"""LeViT (Graham et al. 2021; timm ``levit``): a ViT in a ConvNet's clothing, built of BN-linear
layers (a linear map without bias, then BatchNorm over its outputs: timm's ``LinearNorm``) and no
LayerNorm anywhere.

* ``levit_stem`` (patch_embed): XCiT's stem of 3x3 stride-2 conv + BatchNorm per halving, with
  LeViT's activation (hard swish) and timm's names (``conv1.linear``, ``conv1.bn``, ``act1`` ...).
* ``levit`` (attention): heads of ``key_dim`` queries and keys and ``attn_ratio * key_dim`` values
  from one BN-linear, a learned bias per head for every |offset| on the stage's grid
  (``attention_biases`` indexed by ``attention_bias_idxs``), the activation before the BN-linear
  output projection.
* ``bn_mlp`` (mlp): BN-linear -> activation -> BN-linear.
* ``residual`` (block): x + attn(x), then x + mlp(x), no norms (LeViT's norms are the BN-linears').
* ``avg_bn`` (pool): the mean of the tokens, classified by BatchNorm -> Linear (timm's
  ``NormLinear``), with a distillation classifier averaged in (``distilled``).
* ``levit_subsample`` (transition): attention whose queries come from every ``stride``-th patch
  (timm's ``AttentionDownsample``): the grid shrinks and the width changes; then a residual MLP.

``conv: true`` keeps the BN-linears' weights as timm's ``levit_conv_*`` 1x1 convolutions
(out, in, 1, 1): the same function, the state dict of those models.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention, Block, Mlp, Pool, Transition
from ..context import BuildContext
from ..layers import Linear, drop_path
from ..limits import LIMITS
from ..state import ForwardState
from .xcit_stem import XcitStem

Act = Literal["hardswish", "silu", "gelu", "relu"]
ACTS = {"hardswish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}
_CONV = "weights as timm's levit_conv_* 1x1 convolutions (out, in, 1, 1); the same function"


def bias_index(grid: tuple[int, int], stride: int = 1, device=None) -> torch.Tensor:
    """(Nq, Nk) row of each query-key pair in a per-head bias table of ``gh * gw`` rows: the
    offset |dy| * gw + |dx| between the query (every ``stride``-th patch) and the key (timm's
    ``attention_bias_idxs``)."""
    gh, gw = grid
    ar = lambda n, s=1: torch.arange(0, n, s, device=device)  # noqa: E731
    k = torch.stack(torch.meshgrid(ar(gh), ar(gw), indexing="ij")).flatten(1)  # (2, Nk)
    q = torch.stack(torch.meshgrid(ar(gh, stride), ar(gw, stride), indexing="ij")).flatten(1)  # (2, Nq)
    rel = (q[:, :, None] - k[:, None, :]).abs()  # (2, Nq, Nk)
    return rel[0] * gw + rel[1]


def _refuse_prefix_and_dynamic(ctx: BuildContext) -> None:
    if ctx.num_prefix_tokens:
        raise ValueError("has biases for patches on the grid only: no class or register tokens "
                         "(set class_token: false, reg_tokens: 0)")
    if ctx.dynamic_img_size:
        raise ValueError("learns a bias per offset on a fixed grid: no dynamic_img_size")


class BnLinear(nn.Module):
    """A linear map without bias, then BatchNorm1d over its outputs: (B, N, in) -> (B, N, out)
    (timm's ``LinearNorm``; its ``ConvNorm`` 1x1 with ``conv``, weight (out, in, 1, 1))."""

    def __init__(self, in_features: int, out_features: int, conv: bool = False, bn_weight_init: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.linear = (nn.Conv2d(in_features, out_features, 1, bias=False, **fk) if conv
                       else nn.Linear(in_features, out_features, bias=False, **fk))
        self.bn = nn.BatchNorm1d(out_features, **fk)
        nn.init.constant_(self.bn.weight, bn_weight_init)  # 0 on a residual branch's output, as timm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.linear.weight.flatten(1))  # (B, N, out)
        return self.bn(x.flatten(0, 1)).reshape_as(x)  # statistics over every token


class LevitStem(XcitStem):
    """3x3 stride-2 conv + BatchNorm per halving, activation between, widening to embed_dim (LeViT)."""

    name = "levit_stem"

    class Params(XcitStem.Params):
        act: Act = "hardswish"

    def __init__(self, ctx: BuildContext, params: Params):
        super(XcitStem, self).__init__(ctx, params)  # PatchEmbed's: the layers are built here, under timm's names
        fk, D = ctx.factory_kwargs, ctx.embed_dim
        n = ctx.patch_size[0].bit_length() - 1  # halvings: a square power of two (XcitStem checks)
        widths = [ctx.in_chans] + [D // 2 ** (n - 1 - i) for i in range(n)]  # timm's Stem16 / Stem8
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:]), start=1):
            if i > 1:
                self.add_module(f"act{i - 1}", ACTS[params.act]())
            conv = nn.Module()  # timm's ConvNorm: ``conv{i}.linear`` then ``conv{i}.bn``
            conv.linear = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False, **fk)
            conv.bn = nn.BatchNorm2d(c_out, **fk)
            self.add_module(f"conv{i}", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.named_children():
            x = layer.bn(layer.linear(x)) if name.startswith("conv") else layer(x)  # (B, C, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, gh * gw, D)


class LevitAttention(Attention):
    """Attention with BN-linear projections, a learned bias per head and offset on the grid, and
    value heads ``attn_ratio`` times the key width (LeViT; timm ``levit.Attention``). Prefix tokens,
    which LeViT has none of, get no bias."""

    name = "levit"
    splits_width = False  # each head is key_dim wide: the width need not divide by the heads
    takes_qk_transform = False  # queries and keys are key_dim wide, not head_dim: a RoPE sized for heads misfits

    class Params(Attention.Params):
        key_dim: int = Field(16, gt=0, le=LIMITS["embed_dim"], description="query and key width per head")
        attn_ratio: float = Field(2.0, gt=0.0, le=1024.0, description="value width per head over key_dim")
        act: Act = Field("hardswish", description="activation before the output projection")
        conv: StrictBool = Field(False, description=_CONV)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.dynamic_img_size:
            raise ValueError("learns a bias per offset on a fixed grid: no dynamic_img_size")
        if int(params.attn_ratio * params.key_dim) < 1:
            raise ValueError(f"needs attn_ratio * key_dim >= 1 (a value width), got {params.attn_ratio} * {params.key_dim}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, h = ctx.factory_kwargs, ctx.num_heads
        self.num_heads, self.key_dim, self.val_dim = h, params.key_dim, int(params.attn_ratio * params.key_dim)
        self.grid = tuple(ctx.grid_size)
        self.qkv = BnLinear(ctx.embed_dim, h * (2 * self.key_dim + self.val_dim), params.conv, **fk)
        self.proj = nn.Sequential(OrderedDict([
            ("act", ACTS[params.act]()),
            ("ln", BnLinear(h * self.val_dim, ctx.embed_dim, params.conv, bn_weight_init=0.0, **fk))]))
        self.attention_biases = nn.Parameter(torch.zeros(h, self.grid[0] * self.grid[1], **fk))
        # not persistent: a function of the grid (timm drops it from checkpoints too)
        self.register_buffer("attention_bias_idxs", bias_index(self.grid, device=ctx.device), persistent=False)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if state.require_grid("levit attention") != self.grid:
            raise ValueError(f"levit attention has biases for a {self.grid} grid, got {state.grid}")
        B, N, _ = x.shape
        h, kd = self.num_heads, self.key_dim
        q, k, v = self.qkv(x).view(B, N, h, -1).split([kd, kd, self.val_dim], dim=3)  # (B, N, h, ·) each
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, N, ·)
        q, k = state.transform_qk(q, k)
        bias = self.attention_biases[:, self.attention_bias_idxs][None]  # (1, h, gh * gw, gh * gw)
        if state.num_prefix:  # prefix tokens (none in LeViT) attend and are attended without a bias
            bias = F.pad(bias, (state.num_prefix, 0, state.num_prefix, 0))  # (1, h, N, N)
        if state.attn_bias is not None:
            bias = bias + state.attn_bias
        x = self.attend(q, k, v, bias=bias.to(q.dtype))  # (B, h, N, val_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, h * self.val_dim))


class BnMlp(Mlp):
    """BN-linear -> activation -> BN-linear (LeViT; timm ``LevitMlp``)."""

    name = "bn_mlp"

    class Params(Mlp.Params):
        act: Act = "hardswish"
        conv: StrictBool = Field(False, description=_CONV)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, hidden = ctx.factory_kwargs, ctx.mlp_hidden_dim
        self.ln1 = BnLinear(ctx.embed_dim, hidden, params.conv, **fk)
        self.act = ACTS[params.act]()
        self.drop = nn.Dropout(ctx.proj_drop)
        self.ln2 = BnLinear(hidden, ctx.embed_dim, params.conv, bn_weight_init=0.0, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.drop(self.act(self.ln1(x))))  # (B, N, hidden) inside


class ResidualBlock(Block):
    """No norms: x + attn(x), then x + mlp(x) (LeViT, timm ``LevitBlock``, whose norms are inside its layers)."""

    name = "residual"

    def __init__(self, ctx: BuildContext, params: Block.Params):
        super().__init__(ctx, params)
        self.attn = ctx.make("attention")
        self.drop_path1 = drop_path(ctx.drop_path)
        self.mlp = ctx.make("mlp")
        self.drop_path2 = drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x, state))
        return x + self.drop_path2(self.mlp(x))


class NormLinear(nn.Module):
    """BatchNorm1d, then a Linear with bias: features (B, D) -> logits (timm's ``NormLinear``)."""

    def __init__(self, dim: int, num_classes: int, device=None, dtype=None):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, device=device, dtype=dtype)
        self.linear = Linear(dim, num_classes, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:  # one sample has no batch statistics: the running ones
            bn = self.bn  # (BatchNorm1d refuses it; a memory prediction trains on a batch of one)
            return self.linear(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        return self.linear(self.bn(x))


class LevitHead(NormLinear):
    """The classifier (this ``NormLinear``: timm's ``head``) and, when distilled, the distillation
    classifier (``dist``: timm's ``head_dist``) on the same features, logits averaged."""

    def __init__(self, dim: int, num_classes: int, distilled: bool, device=None, dtype=None):
        super().__init__(dim, num_classes, device=device, dtype=dtype)
        self.dist = NormLinear(dim, num_classes, device=device, dtype=dtype) if distilled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.dist is None else (out + self.dist(x)) / 2


class AvgBnPool(Pool):
    """Mean over the patch tokens, classified by BatchNorm then Linear, with LeViT's distillation
    classifier averaged in when ``distilled`` (timm ``Levit`` / ``LevitDistilled`` heads)."""

    name = "avg_bn"

    class Params(Pool.Params):
        distilled: StrictBool = Field(False, description="a second BN-linear classifier, logits averaged (head_dist)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.num_prefix = ctx.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.num_prefix:].mean(dim=1)  # (B, D)

    def make_head(self, ctx: BuildContext, num_classes: int) -> nn.Module:
        if not num_classes:
            return nn.Identity()
        return LevitHead(ctx.embed_dim, num_classes, self.params.distilled, **ctx.factory_kwargs)


class SubsampleAttention(nn.Module):
    """Queries from every ``stride``-th patch, keys and values from all: (B, gh * gw, D_in) ->
    (B, gh' * gw', D_out) (timm's ``AttentionDownsample``, its names)."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], heads: int, key_dim: int, val_dim: int,
                 stride: int, act: str, conv: bool, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.grid, self.stride, self.heads, self.key_dim, self.val_dim = grid, stride, heads, key_dim, val_dim
        self.kv = BnLinear(in_dim, heads * (key_dim + val_dim), conv, **fk)
        self.q = nn.Sequential(OrderedDict([("ln", BnLinear(in_dim, heads * key_dim, conv, **fk))]))
        self.proj = nn.Sequential(OrderedDict([("act", ACTS[act]()),
                                               ("ln", BnLinear(heads * val_dim, out_dim, conv, **fk))]))
        self.attention_biases = nn.Parameter(torch.zeros(heads, grid[0] * grid[1], **fk))
        self.register_buffer("attention_bias_idxs", bias_index(grid, stride, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        B, N, C = x.shape
        h, s = self.heads, self.stride
        k, v = self.kv(x).view(B, N, h, -1).split([self.key_dim, self.val_dim], dim=3)  # (B, N, h, ·)
        sub = x.view(B, *self.grid, C)[:, ::s, ::s]  # (B, gh', gw', D_in)
        out_grid = tuple(sub.shape[1:3])
        q = self.q(sub.reshape(B, -1, C)).view(B, -1, h, self.key_dim)  # (B, Nq, h, kd)
        bias = self.attention_biases[:, self.attention_bias_idxs][None].to(q.dtype)  # (1, h, Nq, N)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias)  # (B, h, Nq, val_dim)
        return self.proj(out.transpose(1, 2).reshape(B, -1, h * self.val_dim)), out_grid


class LevitSubsample(Transition):
    """Subsampling attention into the next stage's width, then a residual BN-linear MLP (LeViT;
    timm ``LevitDownsample``): the grid shrinks by ``stride``, rounding up."""

    name = "levit_subsample"

    class Params(Transition.Params):
        key_dim: int = Field(16, gt=0, le=LIMITS["embed_dim"], description="query and key width per head")
        num_heads: Optional[int] = Field(None, gt=0, le=LIMITS["embed_dim"],
                                         description="heads; null = the previous stage's width // key_dim (timm)")
        attn_ratio: float = Field(4.0, gt=0.0, le=1024.0, description="value width per head over key_dim")
        mlp_ratio: float = Field(2.0, gt=0.0, le=1024.0, description="the MLP's hidden width over the new width")
        stride: int = Field(2, gt=0, le=LIMITS["img_size"])
        act: Act = Field("hardswish", description="the MLP's activation")
        attn_act: Optional[Act] = Field(None, description="activation before the attention's projection; null = act")
        conv: StrictBool = Field(False, description=_CONV)

    @classmethod
    def out_grid(cls, grid, params: Params):
        return tuple((g - 1) // params.stride + 1 for g in grid)

    @staticmethod
    def heads(ctx: BuildContext, params: Params) -> int:
        return params.num_heads or ctx.in_dim // params.key_dim

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        _refuse_prefix_and_dynamic(ctx)
        if cls.heads(ctx, params) < 1:
            raise ValueError(f"has no heads: the previous width {ctx.in_dim} is below key_dim {params.key_dim} "
                             "(set num_heads)")
        if int(params.attn_ratio * params.key_dim) < 1 or int(ctx.embed_dim * params.mlp_ratio) < 1:
            raise ValueError("needs attn_ratio * key_dim >= 1 and embed_dim * mlp_ratio >= 1")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk = ctx.factory_kwargs
        self.attn_downsample = SubsampleAttention(
            ctx.in_dim, ctx.embed_dim, tuple(ctx.grid_size), self.heads(ctx, params), params.key_dim,
            int(params.attn_ratio * params.key_dim), params.stride, params.attn_act or params.act, params.conv, **fk)
        mlp_ctx = ctx.replace(mlp_hidden_dim=int(ctx.embed_dim * params.mlp_ratio), proj_drop=0.0)
        self.mlp = BnMlp(mlp_ctx, BnMlp.Params(act=params.act, conv=params.conv))
        self.drop_path = drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}'")
        if grid != self.attn_downsample.grid:
            raise ValueError(f"transition '{self.name}' has biases for a {self.attn_downsample.grid} grid, got {grid}")
        state.check_tokens(x, f"transition '{self.name}'")
        x, out_grid = self.attn_downsample(x)  # (B, gh' * gw', D_out)
        x = x + self.drop_path(self.mlp(x))
        return x, state.regrid(out_grid)


COMPONENTS = (LevitStem, LevitAttention, BnMlp, ResidualBlock, AvgBnPool, LevitSubsample)
