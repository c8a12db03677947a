"""timm's MViTv2 (``mvitv2``) read into a staged spec, its weights loaded, written back, and
counted: against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest

from vitlab import analyze, build_model
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict

from timm_reference import (
    assert_close, assert_derived_equals_full, assert_flops_match_fvcore, images, outputs, randomize,
)

timm = pytest.importorskip("timm")
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg  # noqa: E402

# small versions of the three layouts: average pooling without a class token (mvitv2_tiny's), a
# class token read by the head (the _cls models') and the width changed by the MLP of a stage's last
# block (mvitv2_large's expand_attn=False); keys and values pooled by 4, 2, 1, 1 per stage
SMALL = {
    "avg": dict(depths=(1, 2, 2, 2), embed_dim=16, num_heads=1),
    "cls": dict(depths=(2, 2, 3, 2), embed_dim=16, num_heads=1, use_cls_token=True),
    "large": dict(depths=(2, 3, 3, 2), embed_dim=16, num_heads=1, expand_attn=False),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = {"OUTPUTS": ("mvitv2_tiny", "mvitv2_small_cls", "mvitv2_large"),
           "ROUND_TRIPS": ("mvitv2_tiny", "mvitv2_small_cls", "mvitv2_large"),
           "FLOPS": ("mvitv2_small_cls", "mvitv2_tiny", "mvitv2_large"),
           "DERIVED": ("mvitv2_small_cls", "mvitv2_tiny", "mvitv2_large")}


def small(kind: str) -> MultiScaleVit:
    return randomize(MultiScaleVit(MultiScaleVitCfg(**SMALL[kind]), img_size=64, num_classes=10)).eval()


def test_stages_and_strides():
    """(All 8 are read in ``test_zoo_coverage``.)"""
    tiny = spec_from_timm("mvitv2_tiny")
    assert [st.depth for st in tiny.stages] == [1, 1, 4, 1]  # timm's (1, 2, 5, 2): a stage's first block is its transition
    assert all(st.transition.name == "pooling_block" for st in tiny.stages[1:])
    assert [(layer.at, layer.attention.params["stride_kv"]) for layer in tiny.layers] == [("0", 4), ("1", 2)]
    assert [st.transition.params["attention"]["stride_kv"] for st in tiny.stages[1:]] == [2, 1, 1]
    # expand_attn=False: timm's (2, 6, 36, 4), each stage's widening last block held by the next transition
    large = spec_from_timm("mvitv2_large")
    assert [st.depth for st in large.stages] == [1, 4, 34, 3]
    assert [(p["widen"], p["in_heads"], p["in_attention"]["stride_kv"], p["attention"]["stride_kv"])
            for p in (st.transition.params for st in large.stages[1:])] == [
        ("mlp", 2, 4, 2), ("mlp", 4, 2, 1), ("mlp", 8, 1, 1)]


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_outputs_weights_and_round_trip(kind):
    ref = small(kind)
    spec = spec_from_timm(ref)
    model = build_model(spec)
    report = load_timm_weights(model, ref)
    assert report.ok and not report.missing and not report.unexpected, str(report)
    x = images(spec)
    want = outputs(ref, x)
    assert_close(outputs(model, x), want)
    back = timm_class(spec)(**timm_kwargs(spec)).eval()
    back.load_state_dict(to_timm_state_dict(model), strict=True)
    assert_close(outputs(back, x), want, rtol=1e-6)
    assert spec_from_timm(back) == spec.model_copy(update={"name": spec_from_timm(back).name})


@pytest.mark.parametrize("kind, tokens", [("cls", [1 + 256, 1 + 64, 1 + 16, 1 + 4]), ("large", [256, 64, 16, 4])])
def test_small_flops_equal_fvcore_and_derived_equals_full(kind, tokens):
    from fvcore.nn import FlopCountAnalysis

    ref = small(kind)  # MViTv2's attention has no fused path: timm's model is the unfused one
    spec = spec_from_timm(ref)
    theirs = FlopCountAnalysis(ref, images(spec, batch=1)).unsupported_ops_warnings(False)
    full = assert_derived_equals_full(spec)
    assert full.flops == theirs.uncalled_modules_warnings(False).total() and full.unsupported == {}
    assert full.stage_tokens == tokens


@pytest.mark.slow
def test_tiny_flops_equal_fvcore_and_derived_equals_full():
    spec, full, theirs = assert_flops_match_fvcore("mvitv2_tiny", rtol=0)
    assert full.flops == 4_704_241_136 and full.stage_tokens == [3136, 784, 196, 49]
    assert analyze(spec, method="derived").flops == full.flops
