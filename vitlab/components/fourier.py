"""XCiT's Fourier position encoding (timm ``xcit.PositionalEncodingFourier``): sine-cosine features
of each patch's row and column, normalised to (0, 2π], projected to the width by a learned 1x1
convolution and added to the patch tokens. Recomputed for the grid of every forward, so it
follows any image size.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..component import PosEncoding
from ..context import BuildContext
from ..state import ForwardState
from ..limits import LIMITS

_EPS = 1e-6  # timm's: keeps the last row / column just below 2π


def fourier_features(grid: tuple[int, int], hidden_dim: int, temperature: float, device=None) -> torch.Tensor:
    """(1, 2 * hidden_dim, gh, gw) float32: ``hidden_dim`` channels for the row, then as many for
    the column, each alternating sin and cos. The operations are timm's, in its order, so the
    values are bitwise timm's."""
    gh, gw = grid
    y = torch.arange(1, gh + 1, device=device).to(torch.float32)[:, None].expand(gh, gw)  # (gh, gw)
    x = torch.arange(1, gw + 1, device=device).to(torch.float32)[None, :].expand(gh, gw)
    y = y / (y[-1:, :] + _EPS) * (2 * math.pi)
    x = x / (x[:, -1:] + _EPS) * (2 * math.pi)
    dim_t = torch.arange(hidden_dim, device=device).to(torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / hidden_dim)  # (hidden,)
    out = []
    for pos in (y[:, :, None] / dim_t, x[:, :, None] / dim_t):  # (gh, gw, hidden)
        out.append(torch.stack([pos[:, :, 0::2].sin(), pos[:, :, 1::2].cos()], dim=3).flatten(2))
    return torch.cat(out, dim=2).permute(2, 0, 1)[None]  # (1, 2 hidden, gh, gw)


class FourierPosEncoding(PosEncoding):
    """Sin-cos features of patch rows and columns, a learned 1x1 conv to the width, added to the patches (XCiT)."""

    name = "fourier"

    class Params(PosEncoding.Params):
        hidden_dim: int = Field(32, gt=0, le=LIMITS["embed_dim"], description="Fourier features per axis (even: alternating sin, cos)")
        temperature: float = Field(10_000.0, gt=0.0)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.hidden_dim % 2:
            raise ValueError(f"needs an even hidden_dim (sin and cos pairs), got {params.hidden_dim}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.hidden_dim, self.temperature = params.hidden_dim, params.temperature
        self.token_projection = nn.Conv2d(2 * params.hidden_dim, ctx.embed_dim, kernel_size=1, **ctx.factory_kwargs)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        weight = self.token_projection.weight
        features = fourier_features(state.grid, self.hidden_dim, self.temperature, device=weight.device)
        pe = self.token_projection(features.to(weight.dtype))  # (1, D, gh, gw), once for the whole batch
        pe = pe.flatten(2).transpose(1, 2)  # (1, gh * gw, D)
        P = state.num_prefix
        return torch.cat([x[:, :P], x[:, P:] + pe], dim=1) if P else x + pe


COMPONENTS = (FourierPosEncoding,)
