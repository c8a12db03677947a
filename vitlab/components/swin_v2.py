"""Swin Transformer V2's pieces (Liu et al. 2022, "Scaling Up Capacity and Resolution"): the
continuous relative position bias of ``window`` attention (``rel_pos: cpb`` as timm's
``swin_transformer_v2``, ``rel_pos: cpb_cr`` as ``swin_transformer_v2_cr``), its cosine attention
scale, and the res-post-norm block with a norm of the residual stream after it (v2-cr's ``norm3``).

Both biases are a small MLP over log-spaced 2-D offsets inside a window, run at every forward
(they are functions of the weights, so they are counted as timm's are):

* ``cpb``: one row per offset, the table ``(2 w - 1)^2`` of
  ``sign(d) * log2(1 + 8 |d| / (w' - 1)) / 3`` (``w'`` the pretrained window, else the window),
  through ``cpb_mlp`` (Linear(2, hidden), ReLU, Linear(hidden, heads) without bias), then looked
  up per (query, key) pair and squashed to ``16 * sigmoid``.
* ``cpb_cr``: one row per (query, key) pair, ``w^4`` rows of ``sign(d) * ln(1 + |d|)``, through
  ``meta_mlp`` (fc1, ReLU, dropout, fc2, both with bias), unsquashed.

Parameter and buffer names are timm's, so checkpoints load under their own names.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..context import BuildContext
from .block import ResPostNormBlock
from .relpos import relative_position_index

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm clamps the learned logit scale at log(100) before exp


def log_spaced_table(w: int, pretrained: int = 0, device=None) -> torch.Tensor:
    """v2's coordinates of every 2-D offset in a ``w`` x ``w`` window: (1, 2w - 1, 2w - 1, 2) float32,
    ``sign(d) * log2(1 + |8 d / (w' - 1)|) / log2(8)`` with ``w'`` = ``pretrained`` or ``w``
    (timm's ``relative_coords_table``; ``max(w' - 1, 1)`` as timm, for a 1x1 window)."""
    d = torch.arange(-(w - 1), w, device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)[None]  # (1, 2w - 1, 2w - 1, 2): (dy, dx)
    table = table / max((pretrained or w) - 1, 1) * 8  # into [-8, 8]
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def log_pair_coords(w: int, device=None) -> torch.Tensor:
    """v2-cr's coordinates of every (query, key) pair in a window: (w^4, 2) float32,
    ``sign(d) * ln(1 + |d|)`` of query minus key (timm's ``relative_coordinates_log``)."""
    a = torch.arange(w, device=device, dtype=torch.float32)
    coords = torch.stack(torch.meshgrid(a, a, indexing="ij")).flatten(1)  # (2, w²)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2)  # (w^4, 2)
    return torch.sign(rel) * torch.log1p(rel.abs())


class MetaMlp(nn.Module):
    """v2-cr's bias MLP under timm ``Mlp``'s names: fc1 -> ReLU -> dropout -> fc2."""

    def __init__(self, hidden: int, heads: int, drop: float, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, heads, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop1(self.act(self.fc1(x))))


def add_continuous_bias(attn: nn.Module, kind: str, w: int, ctx: BuildContext, hidden: int,
                        pretrained: int = 0, drop: float = 0.0) -> None:
    """Give window attention ``attn`` the ``kind`` ("cpb" | "cpb_cr") bias MLP and its coordinate
    buffers, under timm's names. The buffers are not persistent: functions of the window."""
    heads, fk = ctx.num_heads, ctx.factory_kwargs
    if kind == "cpb":
        attn.cpb_mlp = nn.Sequential(nn.Linear(2, hidden, **fk), nn.ReLU(), nn.Linear(hidden, heads, bias=False, **fk))
        attn.register_buffer("relative_coords_table", log_spaced_table(w, pretrained, ctx.device).to(ctx.dtype),
                             persistent=False)
        attn.register_buffer("relative_position_index", relative_position_index((w, w), 0, device=ctx.device),
                             persistent=False)
    else:
        attn.meta_mlp = MetaMlp(hidden, heads, drop, **fk)
        attn.register_buffer("relative_coordinates_log", log_pair_coords(w, ctx.device).to(ctx.dtype),
                             persistent=False)


def continuous_bias(attn: nn.Module, w: int) -> torch.Tensor:
    """The bias of ``add_continuous_bias``'s MLP inside one window: (heads, w², w²)."""
    n = w * w
    if hasattr(attn, "cpb_mlp"):
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)  # ((2w - 1)², heads)
        bias = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)  # (heads, w², w²)
        return 16 * torch.sigmoid(bias)
    return attn.meta_mlp(attn.relative_coordinates_log).transpose(0, 1).reshape(-1, n, n)  # (heads, w², w²)


def add_logit_scale(attn: nn.Module, ctx: BuildContext) -> None:
    """Cosine attention's learned per-head logit scale, (heads, 1, 1) at ln 10 (timm's ``logit_scale``)."""
    attn.logit_scale = nn.Parameter(torch.full((ctx.num_heads, 1, 1), math.log(10.0), **ctx.factory_kwargs))


def cosine_queries(q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine attention on the scaled-dot-product path: q and k (B, h, N, hd) L2-normalised, q also
    times ``exp(min(logit_scale, ln 100))`` and ``sqrt(hd)`` (undoing the kernel's 1 / sqrt(hd)),
    so softmax(q kᵀ / sqrt(hd)) is softmax(scale * cos(q, k))."""
    scale = torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp() * math.sqrt(q.shape[-1])  # (h, 1, 1)
    return nn.functional.normalize(q, dim=-1) * scale, nn.functional.normalize(k, dim=-1)


class ResPostNormNorm3Block(ResPostNormBlock):
    """Res-post-norm followed by a norm of the residual stream: norm3(x + norm2(mlp(x))) (Swin V2-cr's
    ``norm3``, every few blocks of the large models and at the end of a stage)."""

    name = "respostnorm_norm3"

    def __init__(self, ctx: BuildContext, params: ResPostNormBlock.Params):
        super().__init__(ctx, params)
        self.norm3 = ctx.make("norm")

    def forward(self, x: torch.Tensor, state) -> torch.Tensor:
        return self.norm3(super().forward(x, state))


COMPONENTS = (ResPostNormNorm3Block,)
