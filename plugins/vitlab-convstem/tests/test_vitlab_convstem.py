"""vitlab-convstem: patch_embed 'conv_stem' (Xiao et al. 2021) as an installed plugin."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import vitlab
from vitlab_convstem import ConvStem

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "plugins"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10}
STEM8 = {"name": "conv_stem", "params": {"channels": [8, 16, 24]}}


def _stem_params(channels, in_chans, dim, bias=True):
    """3x3 conv weights (no bias) + BatchNorm weight and bias per layer, then the 1x1 projection."""
    n, c_in = 0, in_chans
    for c in channels:
        n += 9 * c_in * c + 2 * c
        c_in = c
    return n + c_in * dim + (dim if bias else 0)


def test_registered_by_the_installed_distribution():
    info = vitlab.get_registry().get("patch_embed", "conv_stem")
    assert info.cls is ConvStem and info.provider == "vitlab-convstem"
    assert info.default_params() == {"channels": [24, 48, 96, 192], "bias": True, "norm": False}


def test_structure_and_parameter_count():
    model = vitlab.build_model(vitlab.load_spec({**TINY, "patch_embed": STEM8}), seed=0)
    stem = model.patch_embed
    kinds = [type(m) for m in stem.stem]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    convs = [m for m in stem.stem if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [((3, 3), (2, 2), w) for w in (8, 16, 24)]
    assert stem.proj.kernel_size == (1, 1) and stem.proj.out_channels == 32
    n = sum(p.numel() for p in stem.parameters())
    assert n == _stem_params([8, 16, 24], 3, 32)


def test_forward_shapes_and_grid():
    model = vitlab.build_model(vitlab.load_spec({**TINY, "patch_embed": STEM8}), seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.patch_embed(x).shape == (2, 16, 32)
        assert model(x).shape == (2, 10)
    # padded stride-2 convs take any size: ceil(36 / 8) = 5
    spec = vitlab.load_spec({**TINY, "img_size": 36, "patch_embed": STEM8})
    assert spec.build_context().grid_size == (5, 5)
    with torch.no_grad():
        assert vitlab.build_model(spec).eval().forward_features(torch.randn(1, 3, 36, 36)).shape == (1, 1 + 25, 32)


def test_patch_size_must_match_the_stem_stride():
    with pytest.raises(vitlab.SpecError) as err:
        vitlab.load_spec({**TINY, "patch_size": 16, "img_size": 64, "patch_embed": STEM8})
    msg = str(err.value)
    assert "patch_embed: conv_stem (plugin 'vitlab-convstem') has 3 stride-2 convs" in msg and "patch_size is 16x16" in msg
    assert "set patch_size: 8, or give 4 channel widths" in msg
    with pytest.raises(vitlab.SpecError, match="channels"):
        vitlab.load_spec({**TINY, "patch_embed": {"name": "conv_stem", "params": {"channels": []}}})


def test_recipe_builds_and_flops_are_reported():
    spec = vitlab.load_spec(RECIPES / "vit_tiny_convstem.yaml", overrides={"depth": 1})  # the stem's counts do not depend on depth
    assert spec.patch_embed.params["channels"] == [24, 48, 96, 192]
    stem = vitlab.analyze(spec, second_opinion=False)
    patchify = vitlab.analyze({**spec.to_dict(), "patch_embed": "conv"}, second_opinion=False)
    assert not stem.unsupported
    # conv multiply-adds of the stem: 224 -> 112 -> 56 -> 28 -> 14, then the 1x1 projection
    sides, widths = [112, 56, 28, 14], [3, 24, 48, 96, 192]
    convs = sum(s * s * 9 * widths[i] * widths[i + 1] for i, s in enumerate(sides)) + 14 * 14 * 192 * 192
    assert stem.by_kind["patch_embed"] == convs  # its BatchNorms are counted under "norm"
    assert stem.flops > patchify.flops
    assert stem.params - patchify.params == _stem_params(widths[1:], 3, 192) - (3 * 16 * 16 * 192 + 192)
    model = vitlab.build_model(spec, seed=0).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
