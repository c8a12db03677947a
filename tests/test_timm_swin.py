"""timm's Swin Transformer v1 (``swin_transformer``) read into a staged spec, its weights loaded,
written back, and counted: against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest
import torch

from vitlab import analyze, build_model, load_spec
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict

from timm_reference import fvcore_flops

timm = pytest.importorskip("timm")

SWIN_V1 = [
    "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
    "swin_base_patch4_window12_384", "swin_large_patch4_window7_224", "swin_large_patch4_window12_384",
    "swin_s3_tiny_224", "swin_s3_small_224", "swin_s3_base_224",
]

# small versions of two real layouts: Swin-T's (one window size, the last stage one window) and
# S3-T's (a window per stage, stage 2 one window and so never shifted), a grid that pads, a head of 0
SMALL = {
    "swin_tiny_patch4_window7_224": dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                         window_size=2, num_classes=10),
    "swin_s3_tiny_224": dict(img_size=96, embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4),
                             window_size=(4, 3, 6, 3), num_classes=0),
}


def test_all_nine_are_read():
    assert sorted(timm.list_models("swin_*", exclude_filters=["swinv2*"])) == sorted(SWIN_V1)
    for name in SWIN_V1:
        spec = spec_from_timm(name)
        assert spec.stages is not None and len(spec.stages) == 4
    spec = spec_from_timm("swin_tiny_patch4_window7_224")
    assert spec == load_spec("swin_tiny", {"name": "swin_tiny_patch4_window7_224"})
    assert [(layer.at, layer.attention.params["shift"]) for layer in spec.layers] == [("1-9:2", 3)]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_weights_and_round_trip(name):
    ref = timm.create_model(name, pretrained=False, **SMALL[name]).eval()
    with torch.no_grad():  # the tables start at trunc_normal(0.02): make them matter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    spec = spec_from_timm(ref)
    model = build_model(spec).eval()
    report = load_timm_weights(model, ref)
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, *spec.img_hw)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)
        back = timm_class(spec)(**timm_kwargs(spec)).eval()
        back.load_state_dict(to_timm_state_dict(model), strict=True)
        torch.testing.assert_close(back(x), want, atol=1e-6, rtol=1e-6)
    assert spec_from_timm(back) == spec.model_copy(update={"name": spec_from_timm(back).name})


@pytest.mark.slow
@pytest.mark.parametrize("name, kw", [
    ("swin_tiny_patch4_window7_224", {}),  # fvcore: 4.509 G
    ("swin_tiny_patch4_window7_224", {"img_size": 384, "window_size": 12}),
])
def test_flops_equal_fvcore_and_derived_equals_full(name, kw):
    spec = spec_from_timm(name, **kw)
    full = analyze(spec)
    assert full.flops == fvcore_flops(name, spec.img_hw, **kw)
    assert analyze(spec, method="derived").flops == full.flops
    if not kw:
        assert full.flops == 4_509_194_496 and full.stage_tokens == [3136, 784, 196, 49]


def test_small_flops_equal_fvcore():
    kw = SMALL["swin_s3_tiny_224"]
    spec = spec_from_timm("swin_s3_tiny_224", **kw)
    assert analyze(spec).flops == analyze(spec, method="derived").flops == fvcore_flops(
        "swin_s3_tiny_224", spec.img_hw, **kw)


def test_what_timm_cannot_take_is_refused():
    spec = load_spec("vit_tiny_swin")  # one width in every stage: timm's Swin doubles it
    with pytest.raises(Exception, match="doubles the width"):
        timm_kwargs(spec)
    odd = load_spec("swin_tiny", {"layers": [{"at": "0-9:2", "attention": {"params": {"shift": 3}}}]})
    with pytest.raises(Exception, match="shift 3 at block 0"):
        timm_kwargs(odd)
