"""Pooling heads: tokens (B, P + N, D) -> features (B, D) for the classifier."""
from __future__ import annotations

import torch
from pydantic import StrictBool
from torch import nn

from ..component import Pool
from ..context import BuildContext


class TokenPool(Pool):
    """The class token's final state, optionally normed after pooling."""

    name = "token"

    class Params(Pool.Params):
        norm: StrictBool = False  # the recipe's norm on the class token only (PiT's norm; timm fc_norm)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if not ctx.class_token:
            raise ValueError("needs a class token (set class_token: true, or use pool: avg)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.norm = ctx.make("norm") if params.norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, 0])  # (B, D)


class AvgPool(Pool):
    """Mean over the patch tokens (prefix tokens excluded), optional norm after pooling."""

    name = "avg"

    class Params(Pool.Params):
        norm: StrictBool = False  # the recipe's norm after pooling (timm fc_norm)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.num_prefix = ctx.num_prefix_tokens
        self.norm = ctx.make("norm") if params.norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, self.num_prefix :].mean(dim=1))  # (B, D)


class NoPool(Pool):
    """No pooling: the head (if any) applies to every token; returns (B, N, ·)."""

    name = "none"
    keeps_tokens = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


COMPONENTS = (TokenPool, AvgPool, NoPool)
