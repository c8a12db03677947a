"""Norms over the last dimension, parameters named ``weight`` / ``bias`` as in torch and timm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Norm
from ..context import BuildContext


class LayerNorm(Norm):
    """LayerNorm (Ba et al. 2016) with learned scale and optional bias."""

    name = "layernorm"

    class Params(Norm.Params):
        eps: float = Field(1e-6, gt=0.0)
        bias: StrictBool = True

    def __init__(self, ctx: BuildContext, params: Params, dim: int | None = None):
        super().__init__(ctx, params, dim)
        self.dim = (dim or ctx.embed_dim,)
        self.eps = params.eps
        self.weight = nn.Parameter(torch.ones(self.dim, **ctx.factory_kwargs))
        self.bias = nn.Parameter(torch.zeros(self.dim, **ctx.factory_kwargs)) if params.bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.dim, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim[0]}, eps={self.eps}"


class RMSNorm(Norm):
    """RMSNorm (Zhang & Sennrich 2019): scale by the root mean square, no centring."""

    name = "rmsnorm"

    class Params(Norm.Params):
        eps: float = Field(1e-6, gt=0.0)

    def __init__(self, ctx: BuildContext, params: Params, dim: int | None = None):
        super().__init__(ctx, params, dim)
        self.dim = (dim or ctx.embed_dim,)
        self.eps = params.eps
        self.weight = nn.Parameter(torch.ones(self.dim, **ctx.factory_kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.dim, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim[0]}, eps={self.eps}"


COMPONENTS = (LayerNorm, RMSNorm)
