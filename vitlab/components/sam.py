"""Segment Anything's image encoder pieces (Kirillov et al. 2023; timm ``vision_transformer_sam``):

* decomposed relative position (MViTv2, Li et al. 2022): a bias added to the attention logits
  that depends on the query, ``q · R_h[row_q - row_k] + q · R_w[col_q - col_k]``, from one table
  of learned embeddings per axis (``rel_pos_h``, ``rel_pos_w``: ``2 side - 1`` rows of
  ``head_dim``). Global (``mhsa_decomposed``: the side is the patch grid's) or inside windows
  (``window_decomposed``: the side is the window's, pads included, as SAM);
* the neck (``sam_neck``): the patch grid as an image through conv 1x1 -> LayerNorm -> conv 3x3 ->
  LayerNorm, averaged into the classifier's features (timm's ``neck`` and ``ClassifierHead``).

Prefix tokens (SAM has none) get no position bias and are left out of the neck.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..component import Pool
from ..context import BuildContext
from ..layers import Linear
from ..state import ForwardState
from ..limits import LIMITS
from .attention import MultiHeadSelfAttention
from .relpos import plus_shared_bias
from .window import WindowAttention


def rel_pos_rows(size: int, table: torch.Tensor) -> torch.Tensor:
    """The embedding of every offset along one axis of side ``size``: (size, size, C) with
    ``R[i, j] = table[i - j + size - 1]``. A table of another length than ``2 size - 1`` is
    resampled linearly first (timm's ``get_rel_pos``)."""
    rows = 2 * size - 1
    if table.shape[0] != rows:  # (L, C) -> (1, C, L) -> (1, C, rows) -> (rows, C)
        table = F.interpolate(table.T[None], size=rows, mode="linear")[0].T
    index = torch.arange(size, device=table.device)
    return table[index[:, None] - index[None, :] + (size - 1)]


def decomposed_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                    grid: tuple[int, int]) -> torch.Tensor:
    """Queries (..., gh * gw, hd) on ``grid`` -> their bias over the same grid's keys
    (..., gh * gw, gh * gw): ``q · R_h[row_q, row_k] + q · R_w[col_q, col_k]``.

    The einsums are timm's (``get_decomposed_rel_pos_bias``), on queries flattened to one batch
    dimension, so fvcore counts them alike.
    """
    gh, gw = grid
    lead, C = q.shape[:-2], q.shape[-1]
    r_q = q.reshape(-1, gh, gw, C)  # (B', gh, gw, hd)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_pos_rows(gh, rel_pos_h))  # (B', gh, gw, gh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_pos_rows(gw, rel_pos_w))  # (B', gh, gw, gw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B', gh, gw, gh, gw): query row, col; key row, col
    return bias.reshape(*lead, gh * gw, gh * gw)


def _axis_tables(module: nn.Module, side: tuple[int, int], ctx: BuildContext) -> None:
    """``rel_pos_h`` (2 gh - 1, hd) and ``rel_pos_w`` (2 gw - 1, hd) on ``module`` (timm's names),
    zero as SAM initialises them."""
    fk = ctx.factory_kwargs
    module.rel_pos_h = nn.Parameter(torch.zeros(2 * side[0] - 1, ctx.head_dim, **fk))
    module.rel_pos_w = nn.Parameter(torch.zeros(2 * side[1] - 1, ctx.head_dim, **fk))


class DecomposedRelPosAttention(MultiHeadSelfAttention):
    """Multi-head self-attention plus SAM's decomposed relative position, over the whole grid."""

    name = "mhsa_decomposed"

    def __init__(self, ctx: BuildContext, params: MultiHeadSelfAttention.Params):
        super().__init__(ctx, params)
        _axis_tables(self, ctx.grid_size, ctx)  # another grid resamples them, as timm does

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        state.require_grid(f"attention '{self.name}' (block {state.block_index}, a relative position bias)")
        q, k, v = self.qkv_heads(x)  # (B, h, P + N, hd)
        P = state.num_prefix
        own = decomposed_bias(q[:, :, P:], self.rel_pos_h, self.rel_pos_w, state.grid)  # (B, h, N, N)
        if P:  # prefix rows and columns: no position bias
            own = F.pad(own, (P, 0, P, 0))
        q, k = state.transform_qk(q, k)
        drop = self.attn_drop if self.training else 0.0
        return self.out(self.attend(q, k, v, dropout_p=drop, bias=plus_shared_bias(own, state)))


class DecomposedRelPosWindowAttention(WindowAttention):
    """Window attention plus SAM's decomposed relative position within each window (pads included)."""

    name = "window_decomposed"

    def __init__(self, ctx: BuildContext, params: WindowAttention.Params):
        super().__init__(ctx, params)
        _axis_tables(self, (params.window_size, params.window_size), ctx)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """``WindowAttention`` attends once over the windows, q (B, h, windows, w², hd) with keys
        (B, h, windows, P + w², hd), and once for the prefix queries over every token, q 4-D:
        the windows get the decomposed bias (none on the prefix keys), the prefix queries none."""
        if q.dim() == 5:
            w = self.window
            own = decomposed_bias(q, self.rel_pos_h, self.rel_pos_w, (w, w))  # (B, h, windows, w², w²)
            prefix = k.shape[-2] - w * w
            if prefix:
                own = F.pad(own, (prefix, 0))
            bias = own if bias is None else own + bias
        return super().attend(q, k, v, dropout_p=dropout_p, bias=bias)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an image (B, C, H, W) (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SamNeck(Pool):
    """SAM's neck on the patch grid (conv 1x1 -> LayerNorm -> conv 3x3 -> LayerNorm), then the
    average over the grid: (B, P + N, D) -> (B, channels)."""

    name = "sam_neck"

    class Params(Pool.Params):
        channels: Optional[int] = Field(
            256, gt=0, le=LIMITS["embed_dim"], description="width of the neck's convolutions; null = no convolutions, only the "
                                   "LayerNorm over the tokens' width (timm neck_chans=None)")
        eps: float = Field(1e-6, gt=0.0, description="epsilon of the neck's LayerNorms (timm LayerNorm2d: 1e-6)")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.dynamic_img_size:
            raise ValueError("sees the tokens only, so it needs the patch grid of img_size: "
                             "set dynamic_img_size: false")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, C, fk = ctx.embed_dim, params.channels, ctx.factory_kwargs
        self.grid = tuple(ctx.grid_size)
        self.num_prefix = ctx.num_prefix_tokens
        if C is None:
            self.neck = LayerNorm2d(D, eps=params.eps, **fk)
        else:  # timm's names: neck.0 ... neck.3
            self.neck = nn.Sequential(
                nn.Conv2d(D, C, kernel_size=1, bias=False, **fk),
                LayerNorm2d(C, eps=params.eps, **fk),
                nn.Conv2d(C, C, kernel_size=3, padding=1, bias=False, **fk),
                LayerNorm2d(C, eps=params.eps, **fk),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, D = x.shape
        image = x[:, self.num_prefix:].transpose(1, 2).reshape(B, D, *self.grid)  # (B, D, gh, gw)
        return F.adaptive_avg_pool2d(self.neck(image), 1).flatten(1)  # (B, channels): timm's 'avg' pool

    def make_head(self, ctx: BuildContext, num_classes: int) -> nn.Module:
        width = self.params.channels or ctx.embed_dim
        return Linear(width, num_classes, **ctx.factory_kwargs) if num_classes else nn.Identity()


COMPONENTS = (DecomposedRelPosAttention, DecomposedRelPosWindowAttention, SamNeck)
