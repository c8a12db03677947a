"""A gated MLP without biases, of any activation: down(act(gate(x)) * up(x)) (Gemma 4's vision
MLP: GELU-tanh, i.e. GeGLU), its projections optionally clamped. timm's and HF's parameter names
(``gate_proj``, ``up_proj``, ``down_proj``); ``swiglu`` is the biased SiLU one under timm ViT's."""
from __future__ import annotations

import torch
from pydantic import StrictBool
from torch import nn

from ..component import Mlp
from ..context import BuildContext
from ..layers import ACTIVATIONS
from .clamped import ClampedLinear
from .mlp import Activation


class GatedMlp(Mlp):
    """Gated MLP: down(act(gate(x)) * up(x)), bias-free, optionally clamped (Gemma 4's GeGLU)."""

    name = "glu"

    class Params(Mlp.Params):
        act: Activation = "gelu_tanh"  # of the gate
        clamp: StrictBool = False  # clamp each projection's input and output (Gemma 4 E2B/E4B)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, hidden, fk = ctx.embed_dim, ctx.mlp_hidden_dim, ctx.factory_kwargs
        self.gate_proj = ClampedLinear(D, hidden, params.clamp, **fk)
        self.up_proj = ClampedLinear(D, hidden, params.clamp, **fk)
        self.down_proj = ClampedLinear(hidden, D, params.clamp, **fk)
        self.act = ACTIVATIONS[params.act]()
        self.drop = nn.Dropout(ctx.proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))  # (B, N, hidden) inside


COMPONENTS = (GatedMlp,)
