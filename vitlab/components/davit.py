"""DaViT's pieces (Ding et al. 2022, "DaViT: Dual Attention Vision Transformers"; timm ``davit``),
each usable in any recipe.

DaViT alternates spatial blocks (``window`` attention: no shift, no bias, the grid zero-padded to
whole windows) with channel blocks (``channel`` attention), both ``prenorm_cpe`` blocks; stages are
joined by ``norm_conv`` transitions; its stem is ``overlap`` (PVTv2's: a 7x7 convolution of stride
4, then a LayerNorm of its own).

* ``prenorm_cpe`` (block): a pre-norm block with a convolutional position encoding (a depthwise
  convolution of the patch grid added to it, timm's ``ConvPosEnc``) before each of its branches.
* ``channel`` (attention): each head mixes its channels. DaViT's: softmax(kᵀ v / sqrt(head_dim)),
  (head_dim x head_dim), applied to the queries; Florence-2's (``v2``): softmax(qᵀ k / sqrt(N))
  applied to the values. Unlike XCiT's ``xca``, no L2 norm and no learned temperature.
* ``norm_conv`` (transition): the recipe's norm over the tokens, then a convolution of stride 2 to
  the next width (timm's ``Downsample``: an even kernel pads the grid on the right and bottom to a
  multiple of it, an odd one pads kernel // 2 on every side).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Transition
from ..context import BuildContext
from ..layers import Linear
from ..limits import LIMITS
from ..state import ForwardState
from .attention import QKVAttention
from .block import PreNormBlock
from .pvt import to_image, to_tokens


class ConvPosEnc(nn.Module):
    """x + act(depthwise conv(x)) over the patch grid; prefix tokens pass unchanged (timm's
    ``ConvPosEnc``, its names: ``proj``, ``act``)."""

    def __init__(self, dim: int, kernel_size: int, act: bool, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, device=device, dtype=dtype)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        grid = state.require_grid(f"the prenorm_cpe block's position encoding (block {state.block_index})")
        P = state.num_prefix
        patches = x[:, P:]
        patches = patches + to_tokens(self.act(self.proj(to_image(patches, grid))))  # (B, N, D)
        return torch.cat([x[:, :P], patches], dim=1) if P else patches


class CpePreNormBlock(PreNormBlock):
    """Pre-norm block with a convolutional position encoding (a depthwise convolution of the grid, added) before each branch (DaViT)."""

    name = "prenorm_cpe"
    gives_mlp_state = True

    class Params(PreNormBlock.Params):
        cpe_kernel: int = Field(3, gt=0, le=LIMITS["img_size"], description="odd side of the position encodings' "
                                "depthwise convolutions")
        cpe_act: StrictBool = Field(False, description="GELU on the convolution before it is added (timm's cpe_act)")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.cpe_kernel % 2 == 0:
            raise ValueError(f"needs an odd cpe_kernel (the grid keeps its size), got {params.cpe_kernel}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk = ctx.factory_kwargs
        self.cpe1 = ConvPosEnc(ctx.embed_dim, params.cpe_kernel, params.cpe_act, **fk)
        self.cpe2 = ConvPosEnc(ctx.embed_dim, params.cpe_kernel, params.cpe_act, **fk)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        x = self.cpe1(x, state)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), state)))
        x = self.cpe2(x, state)
        h = self.norm2(x)
        h = self.mlp(h, state) if self.mlp.takes_state else self.mlp(h)
        return x + self.drop_path2(self.ls2(h))


class ChannelAttention(QKVAttention):
    """Channel attention: each head mixes its channels by a (head_dim x head_dim) softmax over token sums, no L2 norm or temperature (DaViT; Florence-2's v2)."""

    name = "channel"
    takes_attn_bias = False  # channels attend to channels: no token pairs to bias
    has_maps = False  # its probabilities are (head_dim x head_dim) over channels: no map over tokens

    class Params(QKVAttention.Params):
        v2: StrictBool = Field(False, description="Florence-2's ChannelAttentionV2: softmax(qᵀ k / sqrt(N)) applied to "
                               "v; false: DaViT's softmax(kᵀ v / sqrt(head_dim)) applied to q")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.kv_heads not in (None, ctx.num_heads):
            raise ValueError(f"needs a key and value head per query head (kv_heads null), got {params.kv_heads}")

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if state.attn_bias is not None:
            raise ValueError("channel attention mixes channels: it has no place for an additive bias over token "
                             "pairs (relative position)")
        q, k, v = self.qkv_heads(x)  # (B, h, N, hd)
        q, k = state.transform_qk(q, k)
        q, k, v = (t.transpose(-2, -1) for t in (q, k, v))  # (B, h, hd, N): channels are the "tokens"
        if self.params.v2:  # the default scale, 1 / sqrt(N), is v2's
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # rows of kᵀ v weigh the queries' channels
            out = F.scaled_dot_product_attention(k, v, q, scale=self.head_dim ** -0.5)
        return self.out(out.transpose(-2, -1))  # (B, h, N, hd) -> (B, N, D)


class NormConvTransition(Transition):
    """Between stages: the recipe's norm over the tokens received, then a convolution of stride 2 to the new width (DaViT's downsample; an even kernel pads right and bottom to a multiple of it)."""

    name = "norm_conv"

    class Params(Transition.Params):
        kernel_size: int = Field(2, gt=0, le=LIMITS["img_size"], description="side of the convolution (DaViT: 2, "
                                 "padding the grid to a multiple of it; Florence-2: 3, padding 1)")

    @staticmethod
    def pads(grid, k: int) -> tuple[int, int]:
        """The (bottom, right) pads an even kernel ``k`` needs on ``grid``; none for an odd one."""
        return tuple((k - g % k) % k if k % 2 == 0 else 0 for g in grid)

    @classmethod
    def out_grid(cls, grid, params: Params):
        k = params.kernel_size
        p = 0 if k % 2 == 0 else k // 2
        return tuple((g + e + 2 * p - k) // 2 + 1 for g, e in zip(grid, cls.pads(grid, k)))

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, k = ctx.factory_kwargs, params.kernel_size
        self.norm = ctx.make("norm", dim=ctx.in_dim)
        self.conv = nn.Conv2d(ctx.in_dim, ctx.embed_dim, k, stride=2, padding=0 if k % 2 == 0 else k // 2, **fk)
        # prefix tokens (class, registers) get a linear map of their own, as PiT's and Swin's transitions
        self.fc = Linear(ctx.in_dim, ctx.embed_dim, **fk) if ctx.num_prefix_tokens else None

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}' (stage {state.stage_index})")
        state.check_tokens(x, f"transition '{self.name}'")
        P = state.num_prefix
        x = self.norm(x)
        image = to_image(x[:, P:], grid)  # (B, D_in, gh, gw)
        bottom, right = self.pads(grid, self.params.kernel_size)
        if bottom or right:
            image = F.pad(image, (0, right, 0, bottom))
        patches = to_tokens(self.conv(image))  # (B, gh' * gw', D_out)
        out = torch.cat([self.fc(x[:, :P]), patches], dim=1) if self.fc is not None else patches
        return out, state.regrid(self.out_grid(grid, self.params))  # plain ints: no traced shape arithmetic


COMPONENTS = (CpePreNormBlock, ChannelAttention, NormConvTransition)
