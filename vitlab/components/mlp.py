"""Channel MLPs: (B, N, D) -> (B, N, D) through a hidden width of ``int(D * mlp_ratio)``."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, StrictBool
from torch import nn

from ..component import Mlp
from ..context import BuildContext
from ..layers import ACTIVATIONS, Linear

Activation = Literal["gelu", "gelu_tanh", "quick_gelu", "silu", "relu"]


class _MlpBase(Mlp):
    class Params(Mlp.Params):
        bias: StrictBool = True
        norm: StrictBool = False  # the recipe's norm on the hidden features before fc2 (timm scale_mlp_norm)
        out_bias: Optional[StrictBool] = Field(
            None, description="bias on fc2; null = as bias (false: a parallel block's one output bias is the "
            "attention's)")

    def _tail(self, ctx: BuildContext, params: Params) -> None:
        hidden = ctx.mlp_hidden_dim
        self.drop1 = nn.Dropout(ctx.proj_drop)
        self.norm = ctx.make("norm", dim=hidden) if params.norm else nn.Identity()
        out_bias = params.bias if params.out_bias is None else params.out_bias
        self.fc2 = Linear(hidden, ctx.embed_dim, bias=out_bias, **ctx.factory_kwargs)
        self.drop2 = nn.Dropout(ctx.proj_drop)

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(h))))


class FeedForward(_MlpBase):
    """fc1 -> activation -> fc2, the transformer MLP."""

    name = "mlp"

    class Params(_MlpBase.Params):
        act: Activation = "gelu"

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.fc1 = Linear(ctx.embed_dim, ctx.mlp_hidden_dim, bias=params.bias, **ctx.factory_kwargs)
        self.act = ACTIVATIONS[params.act]()
        self._tail(ctx, params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(self.act(self.fc1(x)))  # (B, N, hidden) inside


class SwiGLU(_MlpBase):
    """SwiGLU: fc2(silu(fc1_g(x)) * fc1_x(x)) (Shazeer 2020), weights named as timm's ``SwiGLU``."""

    name = "swiglu"

    def __init__(self, ctx: BuildContext, params: _MlpBase.Params):
        super().__init__(ctx, params)
        hidden = ctx.mlp_hidden_dim
        self.fc1_g = Linear(ctx.embed_dim, hidden, bias=params.bias, **ctx.factory_kwargs)
        self.fc1_x = Linear(ctx.embed_dim, hidden, bias=params.bias, **ctx.factory_kwargs)
        self.act = nn.SiLU()
        self._tail(ctx, params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(self.act(self.fc1_g(x)) * self.fc1_x(x))  # (B, N, hidden) inside


COMPONENTS = (FeedForward, SwiGLU)
