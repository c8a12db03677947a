"""Helpers the timm comparison tests share: weights perturbed away from their initialisation, a
no-grad eval forward, equality within a relative tolerance, and seeded images."""
from __future__ import annotations

import torch
from torch import nn

RTOL = 1e-4  # the bar: outputs equal timm's within 1e-4 of the largest output


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter, so zero biases, unit norm weights and tiny layer scales cannot hide
    a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal within ``rtol`` of the largest output."""
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= rtol * theirs.abs().max().item(), f"max abs difference {diff:.3g}"


def images(spec, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, spec.in_chans, *spec.img_hw, generator=torch.Generator().manual_seed(1))
