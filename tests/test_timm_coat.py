"""timm's CoaT-Lite (``coat``) read into a staged spec, its weights loaded, written back, and counted:
against timm's own models and fvcore on timm's unfused model. CoaT's parallel blocks are refused."""
from __future__ import annotations

import pytest
import torch

from vitlab import SpecError, analyze, build_model
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict

from timm_reference import assert_close, fvcore_flops, randomize

timm = pytest.importorskip("timm")

# small versions of two models: widths that change between stages (one stays), two relative-position
# windows of one head each, MLP ratios per stage, a class-token head and a mean-of-patches head
SMALL = dict(embed_dims=(16, 32, 32, 48), serial_depths=(1, 2, 1, 1), num_heads=2, crpe_window={3: 1, 5: 1},
             mlp_ratios=(2, 2, 1.5, 1.5), num_classes=10, img_size=64)
CASES = {"coat_lite_tiny": dict(SMALL, global_pool="token"),
         "coat_lite_mini": dict(SMALL, global_pool="avg", crpe_window={3: 2}, num_heads=2, qkv_bias=False)}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run, at CASES' sizes
CHECKED = {"OUTPUTS": tuple(CASES), "ROUND_TRIPS": tuple(CASES), "FLOPS": tuple(CASES), "DERIVED": tuple(CASES)}


@pytest.mark.parametrize("name", CASES)
def test_outputs_weights_and_round_trip(name):
    ref = randomize(timm.create_model(name, pretrained=False, **CASES[name]).eval())
    spec = spec_from_timm(ref)
    model = build_model(spec).eval()
    report = load_timm_weights(model, ref)
    assert report.ok and not report.converted
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())  # shared once
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)
        assert_close(model(x), want)
        back = timm_class(spec)(**timm_kwargs(spec)).eval()
        back.load_state_dict(to_timm_state_dict(model), strict=True)  # the blocks' aliases included
        torch.testing.assert_close(back(x), want, atol=1e-6, rtol=1e-6)
    assert spec_from_timm(back) == spec.model_copy(update={"name": spec_from_timm(back).name})


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_flops_equal_fvcore_and_derived_equals_full(name):
    spec = spec_from_timm(timm.create_model(name, pretrained=False, **CASES[name]))
    full = analyze(spec)
    assert full.flops == fvcore_flops(name, spec.img_hw, **CASES[name])
    assert analyze(spec, method="derived").flops == full.flops
    assert full.stage_tokens == [1 + 256, 1 + 64, 1 + 16, 1 + 4]  # each stage's own class token


def test_the_zoo_models_are_read_and_the_parallel_ones_refused():
    spec = spec_from_timm("coat_lite_small")
    assert [st.embed_dim for st in spec.stages] == [64, 128, 320, 512]
    assert spec.pos_embed.params == {"kernel_size": 3, "windows": [3, 5, 7], "head_splits": [2, 3, 3]}
    with pytest.raises(SpecError, match="parallel blocks"):
        spec_from_timm("coat_tiny")


def test_what_timm_cannot_take_is_refused():
    spec = spec_from_timm(timm.create_model("coat_lite_tiny", pretrained=False, **SMALL))
    odd = spec.model_copy(update={"stages": [spec.stages[0].model_copy(update={"num_heads": 1}), *spec.stages[1:]]})
    with pytest.raises(SpecError, match="one num_heads"):
        timm_kwargs(odd)
