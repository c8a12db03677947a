"""XCiT's token mixing (El-Nouby et al. 2021, "XCiT: Cross-Covariance Image Transformers"; timm
``xcit``): cross-covariance attention, the local patch interaction and the two block orderings.

* ``xca`` (attention): each head mixes its *channels*, not its tokens. The attention matrix is
  the softmax of the (head_dim x head_dim) cross-covariance of L2-normalised keys and queries,
  scaled by a learned per-head temperature, so its cost grows linearly with the number of tokens.
* ``xcit`` (block): three residual branches, attention, local patch interaction (LPI: depthwise
  conv - activation - BatchNorm - depthwise conv over the patch grid) and MLP, in timm's order
  1, 3, 2 (the names keep the official checkpoints' numbering: ``norm3``, ``ls3``).
* ``xcit_class`` (block): XCiT's class-attention block, run after a class token was inserted.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..context import BuildContext
from ..layers import ACTIVATIONS, drop_path, layer_scale
from ..state import ForwardState
from ..limits import LIMITS
from .attention import QKVAttention
from .block import TwoBranchBlock
from .class_attention import ClassAttention
from .mlp import Activation


class CrossCovarianceAttention(QKVAttention):
    """Cross-covariance attention: heads mix channels by softmax(temperature * q̂ᵀ k̂), q̂, k̂ L2-normed (XCiT)."""

    name = "xca"
    takes_attn_bias = False  # channels attend to channels: no token pairs to bias
    has_maps = False  # its probabilities are (head_dim x head_dim) over channels: no map over tokens

    class Params(QKVAttention.Params):
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.kv_heads not in (None, ctx.num_heads):
            raise ValueError(f"needs a key and value head per query head (kv_heads null), got {params.kv_heads}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.attn_drop = params.attn_drop
        # one temperature per head, broadcast over its (head_dim, head_dim) matrix (timm's name and shape)
        self.temperature = nn.Parameter(torch.ones(ctx.num_heads, 1, 1, **ctx.factory_kwargs))

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if state.attn_bias is not None:
            raise ValueError("xca mixes channels: it has no place for an additive bias over token pairs "
                             "(relative position)")
        q, k, v = self.qkv_heads(x)  # (B, h, N, hd)
        q, k = state.transform_qk(q, k)
        q, k, v = (t.transpose(-2, -1) for t in (q, k, v))  # (B, h, hd, N): channels are the "tokens"
        # normalised over the tokens; the temperature replaces the 1 / sqrt(d) scale (timm's fused path)
        q = F.normalize(q, dim=-1) * self.temperature
        k = F.normalize(k, dim=-1)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=1.0)  # (B, h, hd, N)
        return self.out(out.transpose(-2, -1))


class LocalPatchInteraction(nn.Module):
    """Depthwise conv - activation - BatchNorm - depthwise conv over the patch grid: patches
    (B, gh * gw, D) -> (B, gh * gw, D). Names as timm's ``xcit.LPI`` (``conv1``, ``act``, ``bn``, ``conv2``)."""

    def __init__(self, dim: int, kernel_size: int, act: str, device=None, dtype=None):
        super().__init__()
        fk, pad = {"device": device, "dtype": dtype}, kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim, **fk)
        self.act = ACTIVATIONS[act]()
        self.bn = nn.BatchNorm2d(dim, **fk)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim, **fk)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, D = x.shape
        x = x.transpose(1, 2).reshape(B, D, *grid)  # (B, D, gh, gw)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(B, D, N).transpose(1, 2)  # (B, gh * gw, D)


class XcitBlock(TwoBranchBlock):
    """XCiT's block: x + attn(norm1 x), then x + LPI(norm3 x) on the patch grid, then x + mlp(norm2 x)."""

    name = "xcit"

    class Params(TwoBranchBlock.Params):
        init_values: Optional[float] = Field(1.0, gt=0.0, description="layer scale init of all three branches "
                                                                       "(timm's eta); null = no layer scale")
        lpi_kernel: int = Field(3, gt=0, le=LIMITS["img_size"], description="odd side of the two depthwise convolutions of the LPI")
        lpi_act: Activation = "gelu"

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.lpi_kernel % 2 == 0:
            raise ValueError(f"needs an odd lpi_kernel (the grid keeps its size), got {params.lpi_kernel}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.norm3 = ctx.make("norm")
        self.local_mp = LocalPatchInteraction(ctx.embed_dim, params.lpi_kernel, params.lpi_act, **ctx.factory_kwargs)
        self.ls3 = layer_scale(ctx.embed_dim, params.init_values, **ctx.factory_kwargs)
        self.drop_path3 = drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), state)))
        state.require_grid(f"the xcit block's local patch interaction (block {state.block_index})")
        # the LPI sees the patches only; prefix tokens pass unchanged (timm's blocks have none)
        P = state.num_prefix
        local = self.drop_path3(self.ls3(self.local_mp(self.norm3(x[:, P:]), state.grid)))  # (B, N, D)
        x = torch.cat([x[:, :P], x[:, P:] + local], dim=1) if P else x + local
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class XcitClassBlock(TwoBranchBlock):
    """XCiT's class-attention block: the class token attends and passes the MLP; the rest follow timm's residuals."""

    name = "xcit_class"

    class Params(TwoBranchBlock.Params):
        init_values: Optional[float] = Field(1.0, gt=0.0, description="layer scale init (timm's eta); null = none")
        tokens_norm: StrictBool = Field(False, description="norm2 over every token, not only the class token")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        ClassAttention.check(ctx, params)  # the same need: a class token leading the tokens

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.tokens_norm = params.tokens_norm

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        # As timm's ``xcit.ClassAttentionBlock`` (and the official code): each residual adds a
        # whole (B, N, D) update. Token 0, the class token, gets its attention output and then its
        # MLP output; every other token gets its own norm1 (first residual) and then itself,
        # normed by norm2 with ``tokens_norm`` (second residual). Only the class token's row of
        # the attention is used: ``class_attn`` computes just that row, any attention gives it.
        h = self.norm1(x)
        cls = self.attn(h, state)[:, :1]  # (B, 1, D)
        x = x + self.drop_path1(self.ls1(torch.cat([cls, h[:, 1:]], dim=1)))
        x = self.norm2(x) if self.tokens_norm else torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        return x + self.drop_path2(torch.cat([self.ls2(self.mlp(x[:, :1])), x[:, 1:]], dim=1))


COMPONENTS = (CrossCovarianceAttention, XcitBlock, XcitClassBlock)
