"""MViTv2's pieces (Li et al. 2022; timm ``mvitv2``), each usable in any recipe:

* ``pooling``: pooling attention. Queries, keys and values are each pooled on the patch grid (a
  depthwise convolution shared by the heads, or a max / average pool) with a stride of their own
  and normed; the queries' residual is added back after attention (residual pooling), and a
  decomposed relative position (a table per axis, read by the queries: ``rel_pos_h``,
  ``rel_pos_w``) is added to the logits between patch tokens (prefix tokens get none). Inside a
  block it keeps the tokens (queries pooled with stride 1); ``pooling_block`` strides them.
* ``pooling_block``: the first block of an MViTv2 stage, as the ``transition`` into it: the
  pooling attention widens the tokens to the stage's width and pools the queries by
  ``stride_q``; the residual is projected to that width (from the normed tokens) and max-pooled
  with the same stride; then the recipe's MLP, as in a pre-norm block. With ``widen: mlp``
  (timm's ``expand_attn=False``, ``mvitv2_large``) the previous stage's last block widens the
  tokens in its MLP instead, so the transition holds that block too (``widen``: at the previous
  stage's width, grid and heads ``in_heads``), then pools at the stage's width.
* ``conv_padded``: a convolution patch embedding with zero padding (kernel ``patch_size``, a
  stride, padding), no norm: MViTv2's 7x7 stride 4 padding 3 stem (with the defaults, stride the
  patch size and no padding, it is ``conv``).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention, PatchEmbed, Transition
from ..context import BuildContext
from ..errors import SpecError
from ..layers import Linear, drop_path
from ..limits import LIMITS
from ..state import ForwardState

Size = Field(gt=0, le=LIMITS["img_size"])


def pooled(grid, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The grid a pool of ``kernel``, ``stride`` and ``padding`` leaves of ``grid``."""
    return tuple((g + 2 * padding - kernel) // stride + 1 for g in grid)


def _to_image(x: torch.Tensor, grid: tuple[int, int], P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, P + gh * gw, hd) -> prefix (B, heads, P, hd) and patches (B * heads, hd, gh, gw)."""
    prefix, x = x[:, :, :P], x[:, :, P:]
    return prefix, x.reshape(-1, grid[0], grid[1], x.shape[-1]).permute(0, 3, 1, 2).contiguous()


def _rel_index(q: int, k: int, device) -> torch.Tensor:
    """(q, k) rows of the relative-position table between q query and k key positions on one axis,
    the coarser side scaled up to the finer (timm's ``cal_rel_pos_type``)."""
    q_ratio, k_ratio = max(k / q, 1.0), max(q / k, 1.0)
    dist = (torch.arange(q, device=device, dtype=torch.long).unsqueeze(-1) * q_ratio
            - torch.arange(k, device=device, dtype=torch.long).unsqueeze(0) * k_ratio)
    dist += (k - 1) * k_ratio
    return dist.long()


class PoolingAttention(Attention):
    """Pooling attention (MViTv2): queries, keys and values each pooled on the patch grid and normed, residual pooling and a decomposed relative position between patches.

    Keys and values are pooled by ``stride_kv``: the attention matrix is N x N_kv, so it keeps no
    maps. Built with ``in_dim`` it maps that width to the context's (``pooling_block``).
    """

    name = "pooling"
    has_maps = False  # keys are pooled: N x N_kv maps, not the N x N that rollout multiplies
    takes_attn_bias = False  # the relative position is its own, read by the pooled queries
    takes_qk_transform = False  # keys pooled / no query-key product: nothing to rotate

    class Params(Attention.Params):
        qkv_bias: StrictBool = True
        kernel: int = Field(3, gt=0, le=LIMITS["img_size"], description="pooling kernel of q, k and v (padding kernel // 2)")
        stride_kv: int = Field(1, gt=0, le=LIMITS["img_size"], description="pooling stride of keys and values")
        mode: Literal["conv", "max", "avg"] = Field(
            "conv", description="conv: a depthwise convolution over each head's channels, then the recipe's norm")
        residual_pooling: StrictBool = Field(True, description="the pooled queries added to the attention's output")
        rel_pos: StrictBool = Field(True, description="decomposed relative position (rel_pos_h, rel_pos_w)")

    def __init__(self, ctx: BuildContext, params: Params, in_dim: Optional[int] = None, stride_q: int = 1):
        super().__init__(ctx, params)
        D_in, D, fk = in_dim or ctx.embed_dim, ctx.embed_dim, ctx.factory_kwargs
        self.num_heads, self.dim_out = ctx.num_heads, D
        hd = D // ctx.num_heads
        k = params.kernel
        self.qkv = Linear(D_in, 3 * D, bias=params.qkv_bias, **fk)
        self.proj = Linear(D, D, **fk)
        self.proj_drop = nn.Dropout(ctx.proj_drop)
        self.residual_pooling = params.residual_pooling
        self.padding = k // 2
        for n, stride in (("q", stride_q), ("k", params.stride_kv), ("v", params.stride_kv)):
            pool, norm = None, None
            if k > 1 or stride > 1:  # a 1x1 pool of stride 1 is none (timm skips it)
                if params.mode == "conv":
                    pool = nn.Conv2d(hd, hd, k, stride=stride, padding=k // 2, groups=hd, bias=False, **fk)
                    norm = ctx.make("norm", dim=hd)
                else:
                    pool = (nn.MaxPool2d if params.mode == "max" else nn.AvgPool2d)(k, stride, k // 2)
            setattr(self, f"pool_{n}", pool)
            setattr(self, f"norm_{n}", norm)
        if params.rel_pos:  # sized as timm does, from the grid it is built for and floor division
            sizes = [2 * max(g // stride_q, g // params.stride_kv) - 1 for g in ctx.grid_size]
            self.rel_pos_h = nn.Parameter(torch.empty(sizes[0], hd, **fk))
            self.rel_pos_w = nn.Parameter(torch.empty(sizes[1], hd, **fk))
            nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
            nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
        else:
            self.rel_pos_h = self.rel_pos_w = None

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        k = params.kernel
        if min(pooled(ctx.grid_size, k, params.stride_kv, k // 2)) < 1:
            raise ValueError(f"kernel {k} with stride_kv {params.stride_kv} pools the "
                             f"{ctx.grid_size[0]}x{ctx.grid_size[1]} grid to nothing")

    def _pool(self, x: torch.Tensor, n: str, grid: tuple[int, int], P: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, heads, P + N, hd) -> pooled (B, heads, P + N', hd) and its grid; prefix tokens pass."""
        pool, norm = getattr(self, f"pool_{n}"), getattr(self, f"norm_{n}")
        if pool is not None:
            prefix, img = _to_image(x, grid, P)
            img = pool(img)  # (B * heads, hd, gh', gw')
            grid = tuple(img.shape[-2:])
            x = img.reshape(-1, self.num_heads, img.shape[1], grid[0] * grid[1]).transpose(2, 3)
            x = torch.cat((prefix, x), dim=2)
        if norm is not None:
            x = norm(x)
        return x, grid

    def _rel_pos_bias(self, q: torch.Tensor, q_grid, k_grid, P: int) -> torch.Tensor:
        """The decomposed relative position as an additive bias (B, heads, P + Nq, P + Nk), zero
        on prefix rows and columns."""
        (qh, qw), (kh, kw) = q_grid, k_grid
        if (2 * max(qh, kh) - 1 > self.rel_pos_h.shape[0]) or (2 * max(qw, kw) - 1 > self.rel_pos_w.shape[0]):
            raise SpecError(f"pooling attention's relative-position tables ({self.rel_pos_h.shape[0]}, "
                            f"{self.rel_pos_w.shape[0]}) are built for a smaller grid than {qh}x{qw}")
        rel_h = self.rel_pos_h[_rel_index(qh, kh, q.device)]  # (qh, kh, hd)
        rel_w = self.rel_pos_w[_rel_index(qw, kw, q.device)]  # (qw, kw, hd)
        B, h, _, hd = q.shape
        r_q = q[:, :, P:].reshape(B, h, qh, qw, hd)
        rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, rel_h)  # (B, heads, qh, qw, kh)
        rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, rel_w)  # (B, heads, qh, qw, kw)
        bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(B, h, qh * qw, kh * kw)
        return F.pad(bias, (P, 0, P, 0)) if P else bias

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """(B, P + N, D_in) on ``state.grid`` -> (B, P + N_q, D), N_q the queries' pooled grid."""
        grid = state.require_grid("pooling attention")
        if state.qk_transform is not None:
            raise SpecError("pooling attention pools queries and keys: it takes no position transform of them "
                            "(RoPE); use pos_embed none or one added to the tokens")
        B, N, _ = x.shape
        P = state.num_prefix
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, hd)
        q, q_grid = self._pool(q, "q", grid, P)
        k, k_grid = self._pool(k, "k", grid, P)
        v, _ = self._pool(v, "v", grid, P)
        bias = self._rel_pos_bias(q, q_grid, k_grid, P) if self.rel_pos_h is not None else None
        out = self.attend(q, k, v, bias=bias)  # (B, heads, P + Nq, hd)
        if self.residual_pooling:
            out = out + q
        out = out.transpose(1, 2).reshape(B, -1, self.dim_out)  # (B, P + Nq, D)
        return self.proj_drop(self.proj(out))


class WideningBlock(nn.Module):
    """timm's last block of an MViTv2 stage with ``expand_attn=False``: a pre-norm block of
    ``pooling`` attention (nothing strided) at the width of ``ctx`` whose MLP ends at ``dim_out``;
    the MLP's residual is then the normed tokens projected (``shortcut_proj_mlp``), as in timm."""

    def __init__(self, ctx: BuildContext, attention: PoolingAttention.Params, dim_out: int):
        super().__init__()
        D = ctx.embed_dim
        self.norm1 = ctx.make("norm")
        self.attn = PoolingAttention(ctx, attention)
        self.drop_path1 = drop_path(ctx.drop_path)
        self.norm2 = ctx.make("norm")
        self.shortcut_proj_mlp = Linear(D, dim_out, **ctx.factory_kwargs) if D != dim_out else None
        self.mlp = ctx.make("mlp")
        fc2 = getattr(self.mlp, "fc2", None)
        if not isinstance(fc2, nn.Linear):
            raise SpecError(f"pooling_block's widen 'mlp' needs an MLP whose output layer is a Linear 'fc2' "
                            f"(it ends at the next stage's width); {type(self.mlp).__name__} has none")
        # the recipe's MLP at this width, its output layer widened to the next stage's
        self.mlp.fc2 = Linear(fc2.in_features, dim_out, bias=fc2.bias is not None, **ctx.factory_kwargs)
        self.drop_path2 = drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """(B, P + N, D) -> (B, P + N, dim_out) on the same grid."""
        x = x + self.drop_path1(self.attn(self.norm1(x), state))
        x_norm = self.norm2(x)
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return shortcut + self.drop_path2(self.mlp(x_norm))


class PoolingBlock(Transition):
    """MViTv2's first block of a stage as the transition into it: pooling attention that widens the tokens and pools the queries by stride_q, a projected and max-pooled residual, then the recipe's MLP.

    Its attention is ``pooling`` with its own params (``attention``: MViTv2's key / value
    stride differs per stage); the norms and the MLP are the recipe's. Prefix tokens pass the
    pools unpooled. With ``widen: mlp`` the previous stage's last block comes first, as
    ``widen`` (a ``WideningBlock`` with ``in_heads`` heads and ``in_attention``), its MLP widening
    the tokens; the pooling block then keeps the width. Its MLP's hidden width is the stage's
    scaled to the previous width (``mlp_hidden_dim * in_dim // embed_dim``).
    """

    name = "pooling_block"

    class Params(Transition.Params):
        stride_q: int = Field(2, gt=0, le=LIMITS["img_size"], description="pooling stride of the queries and the residual")
        attention: PoolingAttention.Params = Field(
            default_factory=PoolingAttention.Params, description="the block's pooling attention (params of 'pooling')")
        widen: Literal["attn", "mlp"] = Field(
            "attn", description="attn: the pooling attention widens the tokens; mlp: the previous stage's last "
            "block, held here, widens them in its MLP (timm's expand_attn=False)")
        in_heads: Optional[int] = Field(None, gt=0, le=LIMITS["embed_dim"],
                                        description="widen mlp: heads of the held block (the previous stage's)")
        in_attention: Optional[PoolingAttention.Params] = Field(
            None, description="widen mlp: the held block's pooling attention; null = attention")

    @classmethod
    def out_grid(cls, grid, params: Params):
        k = params.attention.kernel
        return pooled(grid, k, params.stride_q, k // 2) if k > 1 or params.stride_q > 1 else tuple(grid)

    @staticmethod
    def _skip(stride: int) -> tuple[int, int, int] | None:
        """The residual's max pool (kernel, stride, padding), timm's ``shortcut_pool_attn``."""
        return (stride + 1, stride, (stride + 1) // 2) if stride > 1 else None

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        out = cls.out_grid(ctx.grid_size, params)
        skip = cls._skip(params.stride_q)
        if tuple(pooled(ctx.grid_size, *skip) if skip else ctx.grid_size) != tuple(out):
            raise ValueError(f"the residual's max pool (kernel {params.stride_q + 1}) and the queries' pool (kernel "
                             f"{params.attention.kernel}) give different grids for stride_q {params.stride_q}; "
                             "use kernel 3 (or stride_q 1)")
        PoolingAttention.check(ctx, params.attention)
        if params.widen == "attn":
            if params.in_heads is not None or params.in_attention is not None:
                raise ValueError("in_heads and in_attention are the held block's: set them with widen 'mlp' only")
            return
        if params.in_heads is None or ctx.in_dim % params.in_heads:
            raise ValueError(f"widen 'mlp' needs in_heads dividing the previous width {ctx.in_dim} "
                             f"(got {params.in_heads})")
        PoolingAttention.check(ctx, params.in_attention or params.attention)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D_in, D, fk = ctx.in_dim, ctx.embed_dim, ctx.factory_kwargs
        if params.widen == "mlp":  # the held block at the previous width, grid and heads
            held = ctx.replace(embed_dim=D_in, num_heads=params.in_heads, mlp_hidden_dim=ctx.mlp_hidden_dim * D_in // D)
            self.widen = WideningBlock(held, params.in_attention or params.attention, D)
            D_in = D
        self.norm1 = ctx.make("norm", dim=D_in)
        self.shortcut_proj_attn = Linear(D_in, D, **fk) if D_in != D else None
        skip = self._skip(params.stride_q)
        self.shortcut_pool_attn = nn.MaxPool2d(*skip) if skip else None
        self.attn = PoolingAttention(ctx, params.attention, in_dim=D_in, stride_q=params.stride_q)
        self.drop_path1 = drop_path(ctx.drop_path)
        self.norm2 = ctx.make("norm")
        self.mlp = ctx.make("mlp")
        self.drop_path2 = drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        grid = state.require_grid(f"transition '{self.name}' (stage {state.stage_index})")
        state.check_tokens(x, f"transition '{self.name}'")
        P = state.num_prefix
        if self.params.widen == "mlp":
            x = self.widen(x, state)  # (B, P + N, D)
        x_norm = self.norm1(x)
        # as timm (and the original): the residual is the normed tokens only when projected
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        if self.shortcut_pool_attn is not None:
            prefix, img = _to_image(shortcut.unsqueeze(1), grid, P)  # (B, D, gh, gw)
            img = self.shortcut_pool_attn(img)
            shortcut = torch.cat((prefix[:, 0], img.flatten(2).transpose(1, 2)), dim=1)  # (B, P + N', D)
        new_grid = self.out_grid(grid, self.params)
        x = shortcut + self.drop_path1(self.attn(x_norm, state))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, state.regrid(new_grid)


class PaddedConvPatchEmbed(PatchEmbed):
    """A convolution of kernel patch_size with a stride and zero padding, no norm (overlapping patches: MViTv2's 7x7 stride 4 padding 3 stem)."""

    name = "conv_padded"

    class Params(PatchEmbed.Params):
        stride: Optional[int] = Field(None, gt=0, le=LIMITS["img_size"],
                                      description="step between patches in pixels; null = the patch size")
        padding: int = Field(0, ge=0, le=LIMITS["img_size"], description="zero padding on every side, in pixels")
        bias: StrictBool = True

    @classmethod
    def grid_size(cls, img_size, patch_size, params: Params):
        grid = tuple((s + 2 * params.padding - p) // (params.stride or p) + 1 for s, p in zip(img_size, patch_size))
        if min(grid) < 1:
            raise ValueError(f"image size {img_size[0]}x{img_size[1]} gives no patches")
        return grid

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.proj = nn.Conv2d(ctx.in_chans, ctx.embed_dim, ctx.patch_size, stride=params.stride or ctx.patch_size,
                              padding=params.padding, bias=params.bias, **ctx.factory_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, gh * gw, D)


COMPONENTS = (PoolingAttention, PoolingBlock, PaddedConvPatchEmbed)
