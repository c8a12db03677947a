"""VOLO's pieces (Yuan et al. 2021, "VOLO: Vision Outlooker for Visual Recognition"; timm ``volo``),
each usable in any recipe.

A VOLO is three stages: outlooker blocks on a fine grid, a downsampling into plain self-attention
blocks with a learned position table, then CaiT's class-attention blocks (``class_token``
transition, ``class_attn`` in ``cait_class`` blocks) and a head that adds the patch tokens' best
"token labeling" logits to the class token's:

* ``volo_stem``: the patch embedding, three convolutions with BatchNorm and ReLU (a 7x7 of stride 2,
  two 3x3) to ``hidden_dim`` channels, then a projection of kernel = stride = patch_size / 2
  (timm's VOLO ``PatchEmbed`` with ``stem_conv``); parameter names as timm's (``conv.0`` ...
  ``conv.7``, ``proj``).
* ``outlook``: outlook attention. Each location's token is mapped by a linear (``attn``) straight to
  weights, per head, of its k x k neighbourhood for each of the k x k positions in it ((k²)² per
  head, no queries or keys); the values (``v``) are unfolded into those neighbourhoods, weighed,
  and folded back (overlapping contributions add up), then projected (``proj``). With ``stride`` s
  the weights come from the grid average-pooled by s and the neighbourhoods are taken every s
  locations. It needs the tokens on the grid, without prefix tokens.
* ``volo_downsample``: between stages, a convolution of kernel = stride = ``patch`` (2) to the next
  width (timm's ``Downsample``), then optionally a learned position table of its own for the new
  grid (timm's ``pos_embed``, (1, gh, gw, D), added after the outlooker stage).
* ``token_aux``: the class token's logits plus half the maximum over the patch tokens of an
  auxiliary classifier's (timm's ``aux_head``, token labeling); its pooled features are every token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention, PatchEmbed, Transition
from ..context import BuildContext
from ..errors import SpecError
from ..layers import Linear
from ..limits import LIMITS
from ..state import ForwardState
from .pool import TokenPool
from .pvt import conv_out, to_image, to_tokens

Side = Field(gt=0, le=LIMITS["img_size"])


class VoloStem(PatchEmbed):
    """Three convolutions with BatchNorm and ReLU (7x7 of stride 2, then two 3x3) to hidden_dim channels, then a projection of kernel = stride = patch_size / 2 (VOLO)."""

    name = "volo_stem"

    class Params(PatchEmbed.Params):
        hidden_dim: int = Field(64, gt=0, le=LIMITS["embed_dim"], description="the stem's channels (VOLO-D5: 128)")

    @classmethod
    def grid_size(cls, img_size, patch_size, params: Params):
        if patch_size[0] != patch_size[1] or patch_size[0] % 2:
            raise ValueError(f"needs square patches of an even side (the stem halves first), got "
                             f"{patch_size[0]}x{patch_size[1]}")
        half = conv_out(img_size, 7, 2, 3)  # the stem's 7x7 of stride 2, padding 3
        grid = conv_out(half, patch_size[0] // 2, patch_size[0] // 2, 0)
        if min(grid) < 1:
            raise ValueError(f"image size {img_size[0]}x{img_size[1]} gives no patches")
        return grid

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk, C = ctx.factory_kwargs, params.hidden_dim
        self.conv = nn.Sequential(  # timm's indices: conv.0, conv.1 (BN), conv.3, conv.4, conv.6, conv.7
            nn.Conv2d(ctx.in_chans, C, 7, stride=2, padding=3, bias=False, **fk), nn.BatchNorm2d(C, **fk), nn.ReLU(),
            nn.Conv2d(C, C, 3, padding=1, bias=False, **fk), nn.BatchNorm2d(C, **fk), nn.ReLU(),
            nn.Conv2d(C, C, 3, padding=1, bias=False, **fk), nn.BatchNorm2d(C, **fk), nn.ReLU(),
        )
        k = ctx.patch_size[0] // 2
        self.proj = nn.Conv2d(C, ctx.embed_dim, k, stride=k, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(self.proj(self.conv(x)))  # (B, gh * gw, D)


class OutlookAttention(Attention):
    """Outlook attention: each location weighs its k x k neighbourhood of values with weights a linear reads off the token itself, folded back onto the grid (VOLO)."""

    name = "outlook"
    has_maps = False  # its weights are (B, heads, N, k², k²), not a map over token pairs
    takes_attn_bias = False  # no logits over token pairs to add a bias to
    takes_qk_transform = False  # keys pooled / no query-key product: nothing to rotate

    class Params(Attention.Params):
        kernel_size: int = Field(3, gt=0, le=LIMITS["img_size"], description="the neighbourhood's side k")
        padding: int = Field(1, ge=0, le=LIMITS["img_size"], description="zero padding of the unfold and fold")
        stride: int = Field(2, gt=0, le=LIMITS["img_size"], description="neighbourhoods every stride locations; "
                            "the weights come from the grid average-pooled by it")
        qkv_bias: StrictBool = Field(False, description="bias on the value projection (timm's qkv_bias)")
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.num_prefix_tokens:
            raise ValueError("works on the patch grid alone: no class or register tokens in its stage "
                             "(class_token: false, reg_tokens: 0)")
        k, p, st = params.kernel_size, params.padding, params.stride
        unfolded = conv_out(ctx.grid_size, k, st, p)
        pooled = tuple(-(-g // st) for g in ctx.grid_size)
        if unfolded != pooled:  # one set of weights per neighbourhood
            raise ValueError(f"kernel_size {k}, padding {p} and stride {st} take {unfolded[0]}x{unfolded[1]} "
                             f"neighbourhoods of the {ctx.grid_size[0]}x{ctx.grid_size[1]} grid, its pooling "
                             f"{pooled[0]}x{pooled[1]} weights: folding back needs as many (VOLO: 3, 1, 2)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, fk, k = ctx.embed_dim, ctx.factory_kwargs, params.kernel_size
        self.num_heads, self.head_dim = ctx.num_heads, ctx.head_dim
        self.k, self.padding, self.stride = k, params.padding, params.stride
        self.v = Linear(D, D, bias=params.qkv_bias, **fk)
        self.attn = Linear(D, k ** 4 * ctx.num_heads, **fk)  # (k²)² weights per head
        self.proj = Linear(D, D, **fk)
        self.attn_drop = nn.Dropout(params.attn_drop)
        self.proj_drop = nn.Dropout(ctx.proj_drop)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        grid = state.require_grid(f"attention '{self.name}'")
        if state.num_prefix or state.qk_transform is not None:
            raise SpecError(f"attention '{self.name}' in block {state.block_index} takes neither prefix tokens "
                            "nor a position transform of queries and keys (it has neither)")
        B, N, C = x.shape
        H, W = grid
        kk, s, h = self.k * self.k, self.stride, self.num_heads
        image = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        gh, gw = math.ceil(H / s), math.ceil(W / s)
        v = F.unfold(to_image(self.v(x), grid), self.k, padding=self.padding, stride=s)  # (B, C * k², gh * gw)
        v = v.reshape(B, h, C // h, kk, gh * gw).permute(0, 1, 4, 3, 2)  # (B, h, n, k², hd)
        pooled = F.avg_pool2d(image, s, s, ceil_mode=True).permute(0, 2, 3, 1)  # (B, gh, gw, C)
        a = self.attn(pooled).reshape(B, gh * gw, h, kk, kk).permute(0, 2, 1, 3, 4)  # (B, h, n, k², k²)
        a = self.attn_drop((a * self.head_dim ** -0.5).softmax(dim=-1))
        out = (a @ v).permute(0, 1, 4, 3, 2).reshape(B, C * kk, gh * gw)  # (B, C * k², n)
        out = F.fold(out, (H, W), self.k, padding=self.padding, stride=s)  # (B, C, H, W): overlaps add up
        return self.proj_drop(self.proj(to_tokens(out)))  # (B, N, C)


class VoloDownsample(Transition):
    """Between stages: a convolution of kernel = stride = patch to the new width, then optionally a learned position table of its own for the new grid (VOLO's Downsample and pos_embed)."""

    name = "volo_downsample"

    class Params(Transition.Params):
        patch: int = Field(2, gt=0, le=LIMITS["img_size"], description="the convolution's kernel and stride")
        pos_embed: StrictBool = Field(True, description="add a learned table (1, gh, gw, D) of its own after "
                                      "the convolution (timm's pos_embed)")

    @classmethod
    def out_grid(cls, grid, params: Params):
        return conv_out(grid, params.patch, params.patch, 0)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.num_prefix_tokens:
            raise ValueError("receives the patch grid alone: no class or register tokens before it")
        if min(cls.out_grid(ctx.grid_size, params)) < 1:
            raise ValueError(f"patch {params.patch} larger than the grid {ctx.grid_size[0]}x{ctx.grid_size[1]}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        fk = ctx.factory_kwargs
        self.proj = nn.Conv2d(ctx.in_dim, ctx.embed_dim, params.patch, stride=params.patch, **fk)
        self.pos_embed = None
        if params.pos_embed:
            gh, gw = self.out_grid(ctx.grid_size, params)
            self.pos_embed = nn.Parameter(torch.empty(1, gh, gw, ctx.embed_dim, **fk))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}' (stage {state.stage_index})")
        state.check_tokens(x, f"transition '{self.name}'")
        out = self.out_grid(grid, self.params)
        x = to_tokens(self.proj(to_image(x, grid)))  # (B, gh * gw, D_out)
        if self.pos_embed is not None:
            if tuple(self.pos_embed.shape[1:3]) != tuple(out):
                raise SpecError(f"transition '{self.name}': its position table is for a {self.pos_embed.shape[1]}x"
                                f"{self.pos_embed.shape[2]} grid, not {out[0]}x{out[1]} (no other image sizes)")
            x = x + self.pos_embed.flatten(1, 2)
        return x, state.regrid(out)


class AuxHead(Linear):
    """The class token's classifier (this Linear: timm's ``head``) plus half the maximum over the
    patch tokens of ``aux``'s logits (timm's ``aux_head``): (B, P + N, D) -> (B, classes)."""

    def __init__(self, dim: int, num_classes: int, num_prefix: int, device=None, dtype=None):
        super().__init__(dim, num_classes, device=device, dtype=dtype)
        self.aux = Linear(dim, num_classes, device=device, dtype=dtype)
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, 0]) + 0.5 * self.aux(x[:, self.num_prefix:]).max(1)[0]


class ClassOnly(nn.Module):
    """Without classes: the class token's features, (B, P + N, D) -> (B, D) (timm's output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class TokenAuxPool(TokenPool):
    """The class token's logits plus half the maximum over the patch tokens of an auxiliary classifier's (VOLO's token labeling); pooled features are every token."""

    name = "token_aux"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)  # (B, P + N, D): the head reads the class token and the patches

    def make_head(self, ctx: BuildContext, num_classes: int) -> nn.Module:
        if not num_classes:
            return ClassOnly()
        return AuxHead(ctx.embed_dim, num_classes, ctx.num_prefix_tokens, **ctx.factory_kwargs)


COMPONENTS = (VoloStem, OutlookAttention, VoloDownsample, TokenAuxPool)
