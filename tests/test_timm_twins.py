"""timm's Twins (``twins``: PCPVT and SVT) read into a staged spec, its weights loaded, written
back, and counted: against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest
import torch

from vitlab import analyze, build_model
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict

from timm_reference import assert_close, fvcore_flops, randomize

timm = pytest.importorskip("timm")

TWINS = ["twins_pcpvt_base", "twins_pcpvt_large", "twins_pcpvt_small", "twins_svt_base", "twins_svt_large",
         "twins_svt_small"]

# small versions of the two layouts: PCPVT (sub-sampled attention everywhere, stage 1 of two
# blocks) and SVT (windows on even blocks, one of 3 on a 6x6 grid, one that pads: 3x3 in 2)
SMALL = {
    "twins_pcpvt_small": dict(img_size=64, embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4),
                              num_classes=10),
    "twins_svt_small": dict(img_size=96, embed_dims=(16, 32, 32, 64), depths=(2, 2, 1, 2), num_heads=(1, 2, 2, 4),
                            wss=(4, 3, 2, 2), num_classes=0),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = dict.fromkeys(("OUTPUTS", "ROUND_TRIPS", "FLOPS", "DERIVED"), ("twins_pcpvt_small", "twins_svt_small"))


def test_all_six_are_read():
    assert sorted(timm.list_models("twins_*")) == TWINS
    spec = spec_from_timm("twins_svt_small")
    plans = spec.block_plans()
    assert [p.index for p in plans if p.selections["block"].name == "prenorm_peg"] == [0, 2, 4, 14]
    assert [p.selections["attention"].name for p in plans[:4]] == ["window", "sra", "window", "sra"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_weights_and_round_trip(name):
    ref = randomize(timm.create_model(name, pretrained=False, **SMALL[name]).eval())
    spec = spec_from_timm(ref)
    model = build_model(spec).eval()
    report = load_timm_weights(model, ref)
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, *spec.img_hw)
    with torch.no_grad():
        want = ref(x)
        assert_close(model(x), want)
        back = timm_class(spec)(**timm_kwargs(spec)).eval()
        back.load_state_dict(to_timm_state_dict(model), strict=True)
        torch.testing.assert_close(back(x), want, atol=1e-6, rtol=1e-6)
    assert spec_from_timm(back) == spec.model_copy(update={"name": spec_from_timm(back).name})


def test_small_svt_flops_equal_fvcore_and_derived_equals_full():
    """Windows that fit the grids: where they pad, vitlab's ``window`` projects the padded tokens
    (SAM's order) and timm's locally-grouped attention crops first, so counts differ by the pads."""
    kw = {**SMALL["twins_svt_small"], "wss": (4, 3, 3, 3)}
    spec = spec_from_timm("twins_svt_small", **kw)
    assert analyze(spec).flops == analyze(spec, method="derived").flops == fvcore_flops("twins_svt_small", spec.img_hw, **kw)


@pytest.mark.slow
def test_flops_equal_fvcore_and_derived_equals_full():
    spec = spec_from_timm("twins_pcpvt_small")
    full = analyze(spec)
    assert full.flops == fvcore_flops("twins_pcpvt_small", spec.img_hw) == 3_826_723_648
    assert full.stage_tokens == [3136, 784, 196, 49]
    assert analyze(spec, method="derived").flops == full.flops


def test_what_timm_cannot_take_is_refused():
    spec = spec_from_timm("twins_svt_small", **SMALL["twins_svt_small"])
    shifted = spec.model_copy(update={"layers": [*spec.layers, type(spec.layers[0])(
        at="0", attention={"name": "window", "params": {"window_size": 4, "shift": 2}})]})
    with pytest.raises(Exception, match="no shift"):
        timm_kwargs(shifted)
