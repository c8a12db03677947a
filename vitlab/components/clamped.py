"""A bias-free linear layer whose input and output may be clamped to ranges held as buffers
(Gemma 4's ``Gemma4ClippableLinear``: the E2B/E4B checkpoints ship finite ranges; ±inf, the
initial value, clamps nothing). Used by ``mhsa_qkvnorm`` and ``glu``; not a component itself."""
from __future__ import annotations

import torch
from torch import nn

from ..layers import Linear


class ClampedLinear(nn.Module):
    """``linear`` (no bias), with ``clamp``: ``input_min`` <= x <= ``input_max`` before it and
    ``output_min`` <= y <= ``output_max`` after it (scalar buffers, saved with the weights).

    The weight sits in a child ``linear`` whether or not it clamps: timm's and HF's names."""

    def __init__(self, in_features: int, out_features: int, clamp: bool, device=None, dtype=None):
        super().__init__()
        self.clamp = clamp
        self.linear = Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        if clamp:
            for name, bound in (("input_min", -1), ("input_max", 1), ("output_min", -1), ("output_max", 1)):
                self.register_buffer(name, torch.full((), bound * float("inf"), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clamp:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)

    def extra_repr(self) -> str:
        return f"clamp={self.clamp}"
