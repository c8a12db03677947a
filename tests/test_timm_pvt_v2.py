"""timm's PVTv2 (``pvt_v2``) read into a staged spec, its weights loaded, written back, and counted:
against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest
import torch

from vitlab import analyze, build_model
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict

from timm_reference import assert_close, fvcore_flops, randomize

timm = pytest.importorskip("timm")

PVT_V2 = ["pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"]

# small versions of the two layouts: strided spatial reduction (b0) and linear SRA's pooled keys
# and extra ReLU (b2_li); widths and heads vary per stage, stage 1 has two blocks
SMALL = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), num_classes=10)

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = {"OUTPUTS": ("pvt_v2_b0", "pvt_v2_b2_li"), "ROUND_TRIPS": ("pvt_v2_b0", "pvt_v2_b2_li"),
           "FLOPS": ("pvt_v2_b0", "pvt_v2_b2_li"), "DERIVED": ("pvt_v2_b0", "pvt_v2_b2_li")}


def test_all_seven_are_read():
    assert sorted(timm.list_models("pvt_v2_*")) == sorted(PVT_V2)
    spec = spec_from_timm("pvt_v2_b0")
    assert [st.embed_dim for st in spec.stages] == [32, 64, 160, 256]
    assert [p.selections["attention"].params["sr_ratio"] for p in spec.block_plans()][::2] == [8, 4, 2, 1]


@pytest.mark.parametrize("linear", [False, True], ids=["b0", "b2_li"])
def test_outputs_weights_and_round_trip(linear):
    ref = randomize(timm.create_model("pvt_v2_b0", pretrained=False, linear=linear, **SMALL).eval())
    spec = spec_from_timm(ref)
    model = build_model(spec).eval()
    report = load_timm_weights(model, ref)
    assert not report.missing and not report.unexpected
    for hw in ((64, 64), (48, 80)):  # timm takes any size: the spec is dynamic
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            want = ref(x)
            assert_close(model(x), want)
            back = timm_class(spec)(**timm_kwargs(spec)).eval()
            back.load_state_dict(to_timm_state_dict(model), strict=True)
            torch.testing.assert_close(back(x), want, atol=1e-6, rtol=1e-6)
    assert spec_from_timm(back) == spec.model_copy(update={"name": spec_from_timm(back).name})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_flops_equal_fvcore_and_derived_equals_full(name):
    spec = spec_from_timm(name)
    full = analyze(spec)
    assert full.flops == fvcore_flops(name, spec.img_hw)
    assert analyze(spec, method="derived").flops == full.flops
    assert full.stage_tokens == [3136, 784, 196, 49]


def test_what_timm_cannot_take_is_refused():
    spec = spec_from_timm(timm.create_model("pvt_v2_b0", pretrained=False, **SMALL))
    odd = spec.model_copy(update={"layers": [*spec.layers, type(spec.layers[0])(at="1", mlp_ratio=2.0)]})
    with pytest.raises(Exception, match="MLP ratio that differs within stage 1"):
        timm_kwargs(odd)
