"""The distillation head of DeiT and PiT (Touvron et al. 2021; timm ``head`` and ``head_dist``):
a class token and a distillation token, each with its own classifier, whose logits are averaged
at inference. The distillation token is the first register token: a learned prefix token like any
other until this pool gives it its own classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from ..context import BuildContext
from ..layers import Linear
from .pool import TokenPool


class DistilledHead(Linear):
    """The class token's classifier (this Linear: timm's ``head``) and the distillation token's
    (``dist``: timm's ``head_dist``), averaged: (B, 2, D) -> (B, classes)."""

    def __init__(self, dim: int, num_classes: int, device=None, dtype=None):
        super().__init__(dim, num_classes, device=device, dtype=dtype)
        self.dist = Linear(dim, num_classes, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (super().forward(x[:, 0]) + self.dist(x[:, 1])) / 2


class TokenMean(nn.Module):
    """Without classes: the mean of the two tokens' features, (B, 2, D) -> (B, D) (timm's output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0] + x[:, 1]) / 2


class DistilledPool(TokenPool):
    """Class and distillation token (the first register token), each to its own classifier,
    logits averaged (DeiT, PiT distilled); pooled features are both tokens, (B, 2, D)."""

    name = "distilled"

    @classmethod
    def check(cls, ctx: BuildContext, params: TokenPool.Params) -> None:
        super().check(ctx, params)
        if ctx.reg_tokens < 1:
            raise ValueError("needs a distillation token after the class token (set reg_tokens: 1)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, :2])  # (B, 2, D): class token, distillation token

    def make_head(self, ctx: BuildContext, num_classes: int) -> nn.Module:
        if not num_classes:
            return TokenMean()
        return DistilledHead(ctx.embed_dim, num_classes, **ctx.factory_kwargs)


COMPONENTS = (DistilledPool,)
