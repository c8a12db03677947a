"""TinyViT (Wu et al. 2022; timm ``tiny_vit``): a convolutional first stage, then window attention
with a learned bias per offset and a depthwise convolution between attention and MLP.

* ``mbconv`` (block): an inverted residual of conv + BatchNorm layers on the patch grid (1x1 up to
  the block's hidden width, depthwise 3x3, 1x1 back), the activation after the residual sum
  (timm's ``MBConv``). It builds no attention and no MLP: TinyViT's first stage is convolutions only.
* ``tiny_vit`` (attention): ``window`` attention whose own norm comes first, on the zero-padded
  windows (pads enter the norm as timm's do), heads packed per head as (q, k, v), and LeViT's bias
  per head for every |offset| inside a window (``attention_biases`` indexed by
  ``attention_bias_idxs``: ``w * w`` rows, where Swin's table has ``(2 w - 1)^2``).
* ``tiny_vit`` (block): x + attn(x) (the attention norms), a depthwise conv + BatchNorm of the grid
  (``local_conv``), then x + mlp(norm2(x)) (timm's ``TinyVitBlock``; its ``NormMlp`` norm is ``norm2``).
* ``conv_merge`` (transition): 1x1 conv + BN to the new width, the activation, a depthwise 3x3
  stride-2 conv + BN, the activation, 1x1 conv + BN (timm's ``tiny_vit.PatchMerging``): the grid
  halves, rounding up.

The stem is ``levit_stem`` with ``act: gelu`` (3x3 stride-2 conv + BN per halving); the head
``adaptive_avg`` with ``norm: true``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..component import Block, Transition
from ..context import BuildContext
from ..layers import Linear, drop_path
from ..limits import LIMITS
from ..state import ForwardState
from .levit import ACTS, Act, bias_index
from .pvt import to_image, to_tokens
from .window import WindowAttention


class ConvNorm(nn.Module):
    """A convolution without bias, then BatchNorm2d: (B, C_in, h, w) -> (B, C_out, h', w') (timm's
    ``tiny_vit.ConvNorm``, its names ``conv`` and ``bn``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 bn_weight_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False, **fk)
        self.bn = nn.BatchNorm2d(c_out, **fk)
        nn.init.constant_(self.bn.weight, bn_weight_init)  # 0 on a residual branch's output, as timm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:  # one value per channel: no batch
            bn = self.bn  # statistics (a 1x1 grid in a memory prediction's batch of one): the running ones
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return self.bn(x)


def _on_grid(x: torch.Tensor, state: ForwardState, who: str, fn) -> torch.Tensor:
    """``fn`` applied to the patch tokens as an image (B, D, gh, gw); prefix tokens pass unchanged."""
    grid = state.require_grid(f"{who} (block {state.block_index})")
    state.check_tokens(x, who)
    P = state.num_prefix
    patches = to_tokens(fn(to_image(x[:, P:], grid)))  # (B, gh * gw, D)
    return torch.cat([x[:, :P], patches], dim=1) if P else patches


class MBConvBlock(Block):
    """Inverted residual of conv + BatchNorm on the patch grid: 1x1 to the hidden width, depthwise 3x3, 1x1 back, the activation after the sum; no attention, no MLP (TinyViT's first stage; timm MBConv)."""

    name = "mbconv"

    class Params(Block.Params):
        act: Act = Field("gelu", description="activation after each conv and after the residual sum")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, D, mid = ctx.factory_kwargs, ctx.embed_dim, ctx.mlp_hidden_dim  # hidden: int(D * mlp_ratio)
        self.conv1 = ConvNorm(D, mid, **fk)
        self.act1 = ACTS[params.act]()
        self.conv2 = ConvNorm(mid, mid, 3, groups=mid, **fk)
        self.act2 = ACTS[params.act]()
        self.conv3 = ConvNorm(mid, D, bn_weight_init=0.0, **fk)
        self.act3 = ACTS[params.act]()
        self.drop_path = drop_path(ctx.drop_path)

    def _residual(self, img: torch.Tensor) -> torch.Tensor:
        h = self.conv3(self.act2(self.conv2(self.act1(self.conv1(img)))))  # (B, D, gh, gw)
        return self.act3(img + self.drop_path(h))

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        return _on_grid(x, state, f"block '{self.name}'", self._residual)


class TinyVitAttention(WindowAttention):
    """Window attention with its own norm first (applied to the padded windows), qkv packed per head, and LeViT's learned bias per head and |offset| inside a window (TinyViT; timm tiny_vit.Attention)."""

    name = "tiny_vit"

    class Params(WindowAttention.Params):
        window_size: int = Field(7, gt=0, le=LIMITS["img_size"],
                                 description="window side in patches; the grid is zero-padded to whole windows")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        super().check(ctx, params)
        if params.kv_heads is not None:
            raise ValueError("packs q, k and v per head (TinyViT): no kv_heads")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        w, fk = self.window, ctx.factory_kwargs
        self.norm = ctx.make("norm")
        self.attention_biases = nn.Parameter(torch.zeros(self.num_heads, w * w, **fk))
        # not persistent: a function of the window (timm drops it from checkpoints too)
        self.register_buffer("attention_bias_idxs", bias_index((w, w), device=ctx.device), persistent=False)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v (B, heads, N, head_dim) each, normed first; timm packs each head's
        q, k, v together: the projection's rows are (heads, 3, head_dim)."""
        B, N, _ = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, hd) each
        return self.q_norm(q), self.k_norm(k), v

    def window_bias(self, padded, shift, prefix, like):
        """The window's bias per head and |offset| (1, heads, 1, w², P + w²), plus any of ``window``'s."""
        bias = self.attention_biases[:, self.attention_bias_idxs][None, :, None].to(like.dtype)  # (1, h, 1, w², w²)
        base = super().window_bias(padded, shift, 0, like)
        if base is not None:
            bias = bias + base
        return F.pad(bias, (prefix, 0)) if prefix else bias


class TinyVitBlock(Block):
    """x + attn(x) (the attention norms its input), a depthwise conv + BatchNorm of the patch grid, then x + mlp(norm2(x)) (TinyViT; timm TinyVitBlock)."""

    name = "tiny_vit"

    class Params(Block.Params):
        local_conv_size: int = Field(3, gt=0, le=LIMITS["img_size"],
                                     description="odd side of the depthwise conv between attention and MLP")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.local_conv_size % 2 == 0:
            raise ValueError(f"needs an odd local_conv_size (the grid keeps its size), got {params.local_conv_size}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, fk = ctx.embed_dim, ctx.factory_kwargs
        self.attn = ctx.make("attention")
        self.drop_path1 = drop_path(ctx.drop_path)
        self.local_conv = ConvNorm(D, D, params.local_conv_size, groups=D, **fk)
        self.norm2 = ctx.make("norm")
        self.mlp = ctx.make("mlp")
        self.drop_path2 = drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x, state))
        x = _on_grid(x, state, f"block '{self.name}'", self.local_conv)  # prefix tokens skip the conv
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ConvMerge(Transition):
    """1x1 conv + BN to the new width, activation, depthwise 3x3 stride-2 conv + BN, activation, 1x1 conv + BN: the grid halves, rounding up (TinyViT; timm tiny_vit.PatchMerging). Prefix tokens get a linear map of their own."""

    name = "conv_merge"

    class Params(Transition.Params):
        act: Act = Field("gelu", description="activation after the first two convs")

    @classmethod
    def out_grid(cls, grid, params: Params):
        return tuple((g - 1) // 2 + 1 for g in grid)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, D = ctx.factory_kwargs, ctx.embed_dim
        self.conv1 = ConvNorm(ctx.in_dim, D, **fk)
        self.act1 = ACTS[params.act]()
        self.conv2 = ConvNorm(D, D, 3, stride=2, groups=D, **fk)
        self.act2 = ACTS[params.act]()
        self.conv3 = ConvNorm(D, D, **fk)
        # prefix tokens (class, registers) get a linear map of their own, as PiT's and Swin's transitions
        self.fc = Linear(ctx.in_dim, D, **fk) if ctx.num_prefix_tokens else None

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}' (stage {state.stage_index})")
        state.check_tokens(x, f"transition '{self.name}'")
        P = state.num_prefix
        image = self.act1(self.conv1(to_image(x[:, P:], grid)))  # (B, D_out, gh, gw)
        patches = to_tokens(self.conv3(self.act2(self.conv2(image))))  # (B, gh' * gw', D_out)
        x = torch.cat([self.fc(x[:, :P]), patches], dim=1) if self.fc is not None else patches
        return x, state.regrid(self.out_grid(grid, self.params))  # plain ints: a trace's shapes would count arithmetic


COMPONENTS = (MBConvBlock, TinyVitAttention, TinyVitBlock, ConvMerge)
