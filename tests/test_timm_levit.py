"""timm's LeViT (``levit``: ``Levit`` and ``LevitDistilled``, linear and ``levit_conv_*`` forms)
read into a staged spec, its weights loaded (BatchNorm running statistics included, compared in
eval mode), written back, and counted: against timm's own models and fvcore on timm's model."""
from __future__ import annotations

import pytest

from vitlab import SpecError, load_spec
from vitlab.timm_interop import spec_from_timm, timm_kwargs

from timm_reference import (
    assert_derived_equals_full, assert_flops_match_fvcore, assert_outputs_match_timm, assert_round_trip, randomize,
    randomize_stats,
)

timm = pytest.importorskip("timm")

# small versions of two real layouts: levit_128's (16 px stem of 4 convs, hard swish, distilled) and
# levit_conv_512_s8's (8 px stem of 3 convs, SiLU, 1x1 convolutions, no distillation), 3 stages
SMALL = {
    "levit_128": dict(img_size=64, embed_dim=(16, 32), key_dim=8, num_heads=(2, 4), depth=(1, 2), num_classes=10),
    "levit_conv_512_s8": dict(img_size=48, embed_dim=(16, 32, 64), key_dim=8, num_heads=(2, 4, 4), depth=(1, 1, 1),
                              num_classes=10),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = {"OUTPUTS": ("levit_128", "levit_conv_512_s8"), "ROUND_TRIPS": ("levit_128", "levit_conv_512_s8"),
           "FLOPS": ("levit_128", "levit_conv_128"), "DERIVED": ("levit_128", "levit_conv_128")}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_weights_and_round_trip(name):
    ref = randomize_stats(randomize(timm.create_model(name, pretrained=False, **SMALL[name]))).eval()
    model, report = assert_outputs_match_timm(ref)
    assert not report.missing and not report.unexpected
    spec = model.spec
    assert spec.attention.params["conv"] == ("_conv" in name)
    assert spec.pool.params["distilled"] == (name == "levit_128")
    assert_round_trip(spec, randomize_stats, timm_cls="LevitDistilled" if name == "levit_128" else "Levit")


def test_the_spec_says_what_levit_is():
    spec = spec_from_timm("levit_128")
    assert [(st.depth, st.embed_dim, st.num_heads) for st in spec.stages] == [(4, 128, 4), (4, 256, 8), (4, 384, 12)]
    assert (spec.patch_embed.name, spec.attention.name, spec.mlp.name, spec.block.name, spec.pool.name,
            spec.transition.name) == ("levit_stem", "levit", "bn_mlp", "residual", "avg_bn", "levit_subsample")
    assert spec.attention.params == {"key_dim": 16, "attn_ratio": 2.0, "act": "hardswish", "conv": False}
    assert spec.transition.params["attn_ratio"] == 4.0 and spec.transition.params["num_heads"] is None
    assert timm_kwargs(spec)["stem_type"] == "s16"


@pytest.mark.slow
def test_flops_equal_fvcore_and_derived_equals_full():
    """fvcore counts timm's BatchNorms (2 per element in eval) and 1x1 convolutions as vitlab's
    BN-linears: equal to the multiply-add (408.7 M, as levit_128's linear form)."""
    spec, full, theirs = assert_flops_match_fvcore("levit_conv_128", rtol=0)
    assert full.flops == 408_723_712 and full.stage_tokens == [196, 49, 16]
    assert assert_derived_equals_full(spec).flops == full.flops


def test_small_flops_equal_fvcore():
    spec, full, _ = assert_flops_match_fvcore("levit_128", rtol=0, **SMALL["levit_128"])
    assert assert_derived_equals_full(spec).flops == full.flops


def test_what_vitlab_cannot_hold_is_refused():
    with pytest.raises(Exception, match="stochastic depth"):
        spec_from_timm("levit_128", drop_path_rate=0.1)
    with pytest.raises(Exception, match="without dropout"):
        spec_from_timm("levit_128", drop_rate=0.1)


def test_heads_need_not_divide_the_width():
    """levit_128s / 192 / 384: a stage 288 wide in 5 heads (each head key_dim wide). The spec
    refuses such a width only where the attention splits it (``Attention.splits_width``)."""
    kw = dict(img_size=48, embed_dim=(16, 30), key_dim=8, num_heads=(3, 4), depth=(1, 1), num_classes=10)
    ref = randomize_stats(randomize(timm.create_model("levit_conv_128s", pretrained=False, **kw))).eval()
    model, _ = assert_outputs_match_timm(ref)
    assert [(st.embed_dim, st.num_heads) for st in model.spec.stages] == [(16, 3), (30, 4)]
    assert_round_trip(model.spec, randomize_stats, timm_cls="LevitDistilled")
    with pytest.raises(SpecError, match="stages.1.num_heads: embed_dim 30 is not divisible by num_heads 4"):
        load_spec(model.spec.model_dump(mode="json") | {"attention": {"name": "mhsa"}, "layers": []})
