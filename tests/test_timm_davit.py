"""timm's DaViT (``davit``) read into a staged spec, its weights loaded, written back, and counted:
against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest
import torch

from vitlab import analyze, build_model, load_spec
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict

from timm_reference import assert_close, assert_derived_equals_full, fvcore_flops, fvcore_flops_of, randomize

timm = pytest.importorskip("timm")

DAVIT = ["davit_base", "davit_base_fl", "davit_giant", "davit_huge", "davit_huge_fl", "davit_large", "davit_small",
         "davit_tiny"]

# small versions of the two layouts: DaViT's (2x2 downsampling, channel attention on the queries) and
# Florence-2's towers (3x3 downsampling, v2 channel attention, named blocks); stage 1 has two pairs
SMALL = dict(embed_dims=(16, 32), depths=(1, 2), num_heads=(1, 2), num_classes=10, window_size=4)
LAYOUTS = {"davit_tiny": {}, "davit_base_fl": dict(down_kernel_size=3, channel_attn_v2=True, named_blocks=True)}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = {"OUTPUTS": tuple(LAYOUTS), "ROUND_TRIPS": tuple(LAYOUTS), "FLOPS": tuple(LAYOUTS), "DERIVED": tuple(LAYOUTS)}


def _small(name: str):
    return timm.create_model("davit_tiny", pretrained=False, **SMALL, **LAYOUTS[name])


def test_all_eight_are_read():
    assert sorted(timm.list_models("davit_*")) == DAVIT
    spec = spec_from_timm("davit_tiny")
    assert [(st.depth, st.embed_dim) for st in spec.stages] == [(2, 96), (2, 192), (6, 384), (2, 768)]
    assert [p.selections["attention"].name for p in spec.block_plans()][:4] == ["window", "channel"] * 2
    assert spec.layers[0].at == "1-11:2"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_outputs_weights_and_round_trip(name):
    ref = randomize(_small(name).eval())
    spec = spec_from_timm(ref)
    model = build_model(spec).eval()
    report = load_timm_weights(model, ref)
    assert not report.missing and not report.unexpected
    back = timm_class(spec)(**timm_kwargs(spec)).eval()
    back.load_state_dict(to_timm_state_dict(model), strict=True)
    for hw in ((64, 64), (36, 44)):  # timm takes any size: the spec is dynamic (9x11: windows and downsampling pad)
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            want = ref(x)
            assert_close(model(x), want)
            torch.testing.assert_close(back(x), want, atol=1e-6, rtol=1e-6)
    assert spec_from_timm(back) == spec.model_copy(update={"name": spec_from_timm(back).name})


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_small_flops_equal_fvcore_and_derived_equals_full(name):
    spec = spec_from_timm(_small(name))
    spec = load_spec({**spec.model_dump(mode="json"), "img_size": 64})
    full = assert_derived_equals_full(spec)
    assert full.flops == fvcore_flops_of(lambda: _small(name), (64, 64))
    assert full.unsupported == {}


@pytest.mark.slow
def test_davit_tiny_flops_equal_fvcore():
    spec = spec_from_timm("davit_tiny")
    full = analyze(spec)
    assert full.flops == fvcore_flops("davit_tiny", spec.img_hw)  # 4.54 G
    assert full.stage_tokens == [3136, 784, 196, 49]


def test_what_timm_cannot_take_is_refused():
    spec = spec_from_timm(_small("davit_tiny"))
    odd = spec.model_copy(update={"layers": [*spec.layers, type(spec.layers[0])(at="2", mlp_ratio=2.0)]})
    with pytest.raises(Exception, match="MLP ratios that differ"):
        timm_kwargs(odd)
    swapped = spec.model_copy(update={"layers": [type(spec.layers[0])(at="0-5:2", attention={"name": "channel"})]})
    with pytest.raises(Exception, match="DaViT: window"):
        timm_kwargs(swapped)
