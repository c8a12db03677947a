"""timm's Hiera (``hiera``) read into a staged spec, its weights loaded, written back, and counted:
against timm's own models and fvcore on timm's unfused model. timm keeps Hiera's tokens unrolled;
vitlab keeps them on the grid, and the outputs agree."""
from __future__ import annotations

import pytest
import torch

from vitlab import analyze, build_model, load_spec
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict

from timm_reference import assert_close, fvcore_flops, outputs, randomize

timm = pytest.importorskip("timm")

TINY = dict(img_size=64, embed_dim=16, num_heads=1, stages=(1, 2, 2, 2), num_classes=10)
# small versions of the two layouts: mask units then global attention, a learned table and projected
# residuals (hiera_tiny_224); an abswin table, layer scale and pooled residuals (hiera_small_abswin_256)
SMALL = {
    "plain": ("hiera_tiny_224", TINY),
    "abswin": ("hiera_small_abswin_256", {**TINY, "global_pos_size": (4, 4), "num_classes": 0}),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = dict.fromkeys(("OUTPUTS", "ROUND_TRIPS", "FLOPS", "DERIVED"), ("hiera_tiny_224", "hiera_small_abswin_256"))


def test_hiera_tiny_is_the_bundled_recipe():
    spec = spec_from_timm("hiera_tiny_224")
    assert spec == load_spec("hiera_tiny", {"name": "hiera_tiny_224"})
    assert [c.grid_size for c in spec.stage_contexts(device="meta")] == [(56, 56), (28, 28), (14, 14), (7, 7)]


@pytest.mark.parametrize("case", sorted(SMALL))
def test_outputs_weights_and_round_trip(case):
    name, kw = SMALL[case]
    ref = randomize(timm.create_model(name, pretrained=False, **kw)).eval()
    spec = spec_from_timm(ref)
    model = build_model(spec).eval()
    report = load_timm_weights(model, ref)
    assert report.ok and not report.missing and not report.unexpected, str(report)
    x = torch.randn(2, 3, *spec.img_hw, generator=torch.Generator().manual_seed(1))
    want = outputs(ref, x)
    assert_close(outputs(model, x), want)
    back = timm_class(spec)(**timm_kwargs(spec)).eval()
    back.load_state_dict(to_timm_state_dict(model), strict=True)
    assert_close(outputs(back, x), want, rtol=1e-6)
    assert spec_from_timm(back) == spec.model_copy(update={"name": spec_from_timm(back).name})


def test_small_flops_equal_fvcore():
    spec = spec_from_timm("hiera_tiny_224", **TINY)
    full = analyze(spec)
    assert full.flops == analyze(spec, method="derived").flops == fvcore_flops("hiera_tiny_224", spec.img_hw, **TINY)
    assert full.unsupported == {} and full.stage_tokens == [256, 64, 16, 4]


def test_abswin_flops_equal_fvcore_but_the_resampling():
    """vitlab counts the bicubic resampling of abswin's global table (16 per output value, 16
    channels on a 16x16 grid); fvcore has no handle for it and counts 0."""
    name, kw = SMALL["abswin"]
    spec = spec_from_timm(name, **kw)
    full = analyze(spec)
    assert full.flops - fvcore_flops(name, spec.img_hw, **kw) == 16 * 16 * 16 * 16
    assert analyze(spec, method="derived").flops == full.flops and full.unsupported == {}


@pytest.mark.slow
def test_hiera_tiny_flops_equal_fvcore():
    spec = spec_from_timm("hiera_tiny_224")
    full = analyze(spec)
    assert full.flops == fvcore_flops("hiera_tiny_224") == 4_914_193_920
    assert full.stage_tokens == [3136, 784, 196, 49]


def test_what_timm_cannot_take_is_refused():
    shifted = load_spec("hiera_tiny", {"layers": [{"at": "0", "attention": {"name": "window", "params": {
        "window_size": 8, "shift": 2}}}]})
    with pytest.raises(Exception, match="Hiera: window or mhsa with their defaults"):
        timm_kwargs(shifted)
    odd = load_spec("hiera_tiny", {"stages": [
        {"depth": 1, "embed_dim": 96, "num_heads": 1},
        {"depth": 1, "embed_dim": 192, "num_heads": 2, "transition": {"name": "q_pool", "params": {"window_size": 4}}},
        {"depth": 6, "embed_dim": 384, "num_heads": 4, "transition": {"name": "q_pool", "params": {"window_size": 4}}},
        {"depth": 1, "embed_dim": 768, "num_heads": 8}]})
    with pytest.raises(Exception, match="q_pool window_size 4 into stage 1"):
        timm_kwargs(odd)
