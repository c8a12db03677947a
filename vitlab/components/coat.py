"""CoaT-Lite's pieces (Xu et al. 2021, "Co-Scale Conv-Attentional Image Transformers"; timm ``coat``),
each usable in any recipe.

CoaT gives every stage a position encoding of its own, shared by the stage's blocks: a depthwise
convolution of the patch grid added before each block (timm's ``ConvPosEnc``, ``cpe{s}``) and
depthwise convolutions of the attention's values, one kernel per group of heads, multiplied by the
queries (``ConvRelPosEnc``, ``crpe{s}``). vitlab holds them as one position encoding per stage:

* ``coat_conv``: both convolutions. The recipe's ``pos_embed`` is the first stage's; each
  ``coat_embed`` transition builds the recipe's position encoding again for its stage (width and
  heads) and hands it to the stage's blocks as the forward state's ``positions``, so the stage's
  blocks share one set of weights, as timm's do.
* ``coat_embed``: the transition into a later stage: the prefix tokens received are dropped, a
  strided convolution and a LayerNorm of its own embed the grid (timm's ``PatchEmbed``), and a
  class token of the stage's own is prepended (``cls_token{s}``).
* ``coat_serial``: CoaT's serial block: the stage's ``before_block`` (the depthwise convolution),
  then a pre-norm block. Under a position encoding without one it is a pre-norm block.
* ``factor``: factorized attention, q (softmax_N(k)ᵀ v) / sqrt(head_dim), plus the stage's
  convolutional relative term q * conv(v) when its position encoding has one. The softmax runs
  over tokens, per channel: there is no (N x N) map, nor a place for an attention bias.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import nn

from ..component import PosEncoding
from ..context import BuildContext
from ..limits import LIMITS
from ..state import ForwardState
from .attention import QKVAttention
from .block import PreNormBlock
from .pvt import ConvEmbedTransition, to_image, to_tokens



class ConvPositions(PosEncoding):
    """CoaT's convolutional position encodings of one stage: a depthwise convolution of the grid added before each block, and depthwise convolutions of the attention's values per group of heads (timm ConvPosEnc, ConvRelPosEnc)."""

    name = "coat_conv"

    class Params(PosEncoding.Params):
        kernel_size: int = Field(3, gt=0, le=LIMITS["img_size"], description="odd side of the convolution before each block")
        windows: tuple[int, ...] = Field((3,), min_length=1, max_length=64,
                                         description="odd side of the values' convolution of each group of heads")
        head_splits: Optional[tuple[int, ...]] = Field(
            None, min_length=1, max_length=64, description="heads in each group, one per window, summing to num_heads "
            "(CoaT: windows [3, 5, 7], head_splits [2, 3, 3]); null = one window for every head")

    @staticmethod
    def splits(num_heads: int, params: Params) -> tuple[int, ...]:
        """The heads of each window; ``ValueError`` when they do not fit ``num_heads``."""
        splits = params.head_splits or ((num_heads,) if len(params.windows) == 1 else ())
        if len(splits) != len(params.windows):
            raise ValueError(f"needs one head_splits entry per window ({len(params.windows)} windows)")
        if sum(splits) != num_heads or min(splits) < 1:
            raise ValueError(f"needs head_splits of at least one head each, summing to num_heads {num_heads}, got "
                             f"{list(splits)}")
        return splits

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if any(k % 2 == 0 or k > LIMITS["img_size"] for k in (params.kernel_size, *params.windows)):
            raise ValueError("needs odd kernel_size and windows (the grid keeps its size)")
        cls.splits(ctx.num_heads, params)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.check(ctx, params)  # a later stage's heads are checked as its transition builds it
        D, k, fk = ctx.embed_dim, params.kernel_size, ctx.factory_kwargs
        self.proj = nn.Conv2d(D, D, k, padding=k // 2, groups=D, **fk)
        # one depthwise convolution per group of heads, over its heads' value channels
        self.channels = [n * ctx.head_dim for n in self.splits(ctx.num_heads, params)]
        self.conv_list = nn.ModuleList(nn.Conv2d(c, c, w, padding=w // 2, groups=c, **fk)
                                       for c, w in zip(self.channels, params.windows))

    def before_block(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """Tokens (B, P + N, D) with the grid's depthwise convolution added to the patches."""
        grid = state.require_grid(f"pos_embed '{self.name}' (block {state.block_index})")
        P = state.num_prefix
        image = to_image(x[:, P:], grid)  # (B, D, gh, gw)
        return torch.cat([x[:, :P], to_tokens(self.proj(image) + image)], dim=1)

    def relative(self, q: torch.Tensor, v: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """q * conv(v), both (B, heads, P + N, head_dim): the convolution per group of heads over
        the patches' values; zero on the prefix rows."""
        B, h, N, hd = v.shape
        P = state.num_prefix
        grid = state.require_grid(f"pos_embed '{self.name}' (attention in block {state.block_index})")
        image = v[:, :, P:].transpose(-1, -2).reshape(B, h * hd, *grid)  # (B, heads * hd, gh, gw)
        parts = torch.split(image, self.channels, dim=1)
        conv = torch.cat([c(p) for c, p in zip(self.conv_list, parts)], dim=1)
        conv = conv.reshape(B, h, hd, N - P).transpose(-1, -2)  # (B, heads, N - P, hd)
        return torch.cat([torch.zeros_like(q[:, :, :P]), q[:, :, P:] * conv], dim=2)


class CoatEmbedTransition(ConvEmbedTransition):
    """Between stages: the prefix tokens received dropped, a strided convolution and a LayerNorm of its own, a class token of the stage's own prepended, and the recipe's position encoding built again for the stage (CoaT's patch_embed{s}, cls_token{s})."""

    name = "coat_embed"

    class Params(ConvEmbedTransition.Params):
        kernel_size: int = Field(2, gt=0, le=LIMITS["img_size"], description="side of the convolution (CoaT: 2)")
        padding: Optional[int] = Field(0, ge=0, le=LIMITS["img_size"], description="null = kernel_size // 2")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.reg_tokens:
            raise ValueError("prepends a class token only: set reg_tokens: 0")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.fc = None  # the prefix received is dropped, not mapped
        fk = ctx.factory_kwargs
        self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, ctx.embed_dim, **fk), std=0.02)) \
            if ctx.class_token else None
        out = ctx.replace(grid_size=self.out_grid(ctx.grid_size, params))
        self.pos_embed = out.make("pos_embed")  # this stage's own, shared by its blocks through the state

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}' (stage {state.stage_index})")
        state.check_tokens(x, f"transition '{self.name}'")
        image = self.proj(to_image(self.in_norm(x)[:, state.num_prefix:], grid))  # (B, D_out, gh', gw')
        x = self.norm(to_tokens(image))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N', D_out)
        state = state.regrid(self.out_grid(grid, self.params), num_prefix=int(self.cls_token is not None),
                             positions=self.pos_embed)
        return self.pos_embed(x, state), state


class SerialBlock(PreNormBlock):
    """CoaT's serial block: the stage position encoding's convolution before the block (under another encoding, nothing), then x + attn(norm1(x)), x + mlp(norm2(x))."""

    name = "coat_serial"

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        before = getattr(state.positions, "before_block", None)
        return super().forward(x if before is None else before(x, state), state)


class FactorAttention(QKVAttention):
    """Factorized attention, q (softmax over tokens of k)ᵀ v / sqrt(head_dim), plus q * conv(v) from the stage's position encoding when it has one (CoaT's FactorAttnConvRelPosEnc)."""

    name = "factor"
    has_maps = False  # the softmax runs over tokens per channel: no (N x N) map
    takes_attn_bias = False

    @classmethod
    def check(cls, ctx: BuildContext, params: QKVAttention.Params) -> None:
        if params.kv_heads not in (None, ctx.num_heads):
            raise ValueError("needs as many key/value heads as query heads (kv_heads: null)")

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)  # (B, heads, N, hd)
        q, k = state.transform_qk(q, k)
        context = k.softmax(dim=2).transpose(-1, -2) @ v  # (B, heads, hd, hd)
        out = (q @ context) * self.head_dim ** -0.5  # (B, heads, N, hd)
        relative = getattr(state.positions, "relative", None)
        if relative is not None:
            out = out + relative(q, v, state)
        return self.out(out)


COMPONENTS = (ConvPositions, CoatEmbedTransition, SerialBlock, FactorAttention)
