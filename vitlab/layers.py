"""Small layers shared by components: an initialised Linear, layer scale, stochastic depth,
activations."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` initialised as in timm's ViT: truncated normal (std 0.02) weights, zero bias."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class QVBiasLinear(Linear):
    """A fused qkv projection whose key bias is a zero buffer (BEiT's, EVA's): trainable ``q_bias``
    and ``v_bias`` (timm's names), ``k_bias`` outside the state dict (without RoPE a key bias would
    only add the same logit to every key of a query).

    Args:
        in_features: the input width.
        sizes: the widths of the q, k and v parts of the output (k and v narrower with grouped-query heads).
    """

    def __init__(self, in_features: int, sizes: tuple[int, int, int], device=None, dtype=None):
        super().__init__(in_features, sum(sizes), bias=False, device=device, dtype=dtype)
        q, k, v = sizes
        self.q_bias = nn.Parameter(torch.zeros(q, device=device, dtype=dtype))
        self.register_buffer("k_bias", torch.zeros(k, device=device, dtype=dtype), persistent=False)
        self.v_bias = nn.Parameter(torch.zeros(v, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "q_bias"):  # nn.Linear's constructor calls this before the biases exist
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))  # (q + k + v,)
        return nn.functional.linear(x, self.weight, bias)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT), parameter ``gamma`` (D,)."""

    def __init__(self, dim: int, init_values: float, device=None, dtype=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def layer_scale(dim: int, init_values: float | None, **factory) -> nn.Module:
    """``LayerScale`` when ``init_values`` is set, else a free identity."""
    return LayerScale(dim, init_values, **factory) if init_values is not None else nn.Identity()


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path(p: float) -> nn.Module:
    return DropPath(p) if p > 0 else nn.Identity()


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation of OpenAI's CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}
