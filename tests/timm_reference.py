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


def fvcore_flops(name: str, img_hw=(224, 224), **kw) -> int:
    """fvcore's FLOPs of timm's own model ``name`` (``create_model(name, **kw)``), built with fused
    attention off as the issue asks (``timm.layers.set_fused_attn(False)`` before ``create_model``;
    timm's flag is restored after): the independent reference FLOP tests compare against."""
    import timm
    from fvcore.nn import FlopCountAnalysis

    config = timm.layers.config
    saved = config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    try:
        tm = timm.create_model(name, pretrained=False, **kw).eval()
    finally:
        config._USE_FUSED_ATTN = saved
    assert not any(getattr(m, "fused_attn", False) for m in tm.modules())
    flops = FlopCountAnalysis(tm, torch.randn(1, 3, *img_hw))
    return flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
