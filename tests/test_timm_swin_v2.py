"""timm's Swin Transformer v2 (``swin_transformer_v2``) and v2-cr (``swin_transformer_v2_cr``) read
into staged specs, their weights loaded, written back, and counted: against timm's own models and
fvcore on timm's unfused models. Every model of both is read on meta in ``test_zoo_coverage``."""
from __future__ import annotations

import pytest

from vitlab import SpecError, analyze, load_spec
from vitlab.timm_interop import spec_from_timm, timm_kwargs

from timm_reference import (
    assert_derived_equals_full, assert_flops_match_fvcore, assert_outputs_match_timm, assert_round_trip, randomize,
)

timm = pytest.importorskip("timm")

# small versions of real layouts: one window everywhere (the last stage one window, so never
# shifted), a window per stage with pretrained windows (v2's 12to16 models), v2-cr's stage-end
# norms (``_ns``) and its every-N-th norm (huge / giant), a grid that pads, a head of 0
SMALL = {
    "swinv2_tiny_window8_256": dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                    window_size=2, num_classes=10),
    "swinv2_base_window12to16_192to256": dict(img_size=96, embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4),
                                              window_size=(4, 3, 6, 3), pretrained_window_sizes=(3, 2, 4, 2),
                                              num_classes=0),
    "swinv2_cr_tiny_ns_224": dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                  window_size=2, num_classes=10),
    "swinv2_cr_huge_224": dict(img_size=96, embed_dim=16, depths=(1, 2, 4, 1), num_heads=(1, 2, 2, 4),
                               window_size=(4, 3, 6, 3), extra_norm_period=2, num_classes=0),
}

# smaller still for the counts (traced twice, and fvcore on timm's): shifted stages in both
FLOPS = {
    "swinv2_base_window12to16_192to256": dict(img_size=64, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4),
                                              window_size=(4, 2, 2, 2), pretrained_window_sizes=(3, 2, 4, 2),
                                              num_classes=0),
    "swinv2_cr_huge_224": dict(img_size=64, embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), window_size=2,
                               extra_norm_period=2, num_classes=0),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = {  # per family: swin_transformer_v2, swin_transformer_v2_cr
    "swin_transformer_v2": {
        "OUTPUTS": ("swinv2_tiny_window8_256", "swinv2_base_window12to16_192to256"),
        "ROUND_TRIPS": ("swinv2_tiny_window8_256", "swinv2_base_window12to16_192to256"),
        "FLOPS": ("swinv2_base_window12to16_192to256", "swinv2_tiny_window8_256"),
        "DERIVED": ("swinv2_base_window12to16_192to256", "swinv2_tiny_window8_256")},
    "swin_transformer_v2_cr": {
        "OUTPUTS": ("swinv2_cr_tiny_ns_224", "swinv2_cr_huge_224"),
        "ROUND_TRIPS": ("swinv2_cr_tiny_ns_224", "swinv2_cr_huge_224"),
        "FLOPS": ("swinv2_cr_huge_224", "swinv2_cr_tiny_224"), "DERIVED": ("swinv2_cr_huge_224", "swinv2_cr_tiny_224")},
}


def test_what_the_specs_say():
    v2 = spec_from_timm("swinv2_base_window12to16_192to256")
    attn = [p.selections["attention"].params for p in v2.block_plans()]
    assert {a["rel_pos"] for a in attn} == {"cpb"} and all(a["cosine"] and a["qkv_bias"] == "qv" for a in attn)
    stages = [[attn[i]["pretrained_window_size"] for i in st.blocks] for st in v2.stage_plans()]
    assert [set(s) for s in stages] == [{12}, {12}, {12}, {6}]
    assert v2.block.name == "respostnorm" and v2.transition.params["norm_last"] and v2.final_norm
    # v2-cr: the norm3 blocks are every 6th of the 18-block stage and the last (no final norm)
    cr = spec_from_timm("swinv2_cr_huge_224")
    norm3 = [p.index for p in cr.block_plans() if p.selections["block"].name == "respostnorm_norm3"]
    assert norm3 == [9, 15, 21, 23] and not cr.final_norm
    assert timm_kwargs(cr)["extra_norm_period"] == 6 and not timm_kwargs(cr)["extra_norm_stage"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_weights_and_round_trip(name):
    """timm's weights load (every tensor placed), outputs equal timm's, and a perturbed vitlab
    model goes back to timm's class with the same outputs and reads back as the same spec."""
    tm = randomize(timm.create_model(name, pretrained=False, **SMALL[name]))
    model, report = assert_outputs_match_timm(tm)
    if "_cr_" in name:  # timm's (heads,) logit scales reshaped, one per block
        assert len(report.converted) == len(model.blocks)
    assert_round_trip(model.spec, timm_cls=type(tm))


@pytest.mark.parametrize("name", sorted(FLOPS))
def test_small_flops_equal_fvcore_and_derived_equals_full(name):
    """v2: equal to fvcore's. v2-cr: its head pools an NCHW map with ``adaptive_avg_pool2d``, which
    fvcore counts at one per element, while vitlab's average pool is a free mean: exactly that apart."""
    spec, full, theirs = assert_flops_match_fvcore(name, **FLOPS[name])
    pooled = spec.stages[-1].embed_dim * full.stage_tokens[-1] if "_cr_" in name else 0
    assert full.flops + pooled == theirs
    # free operators (shape arithmetic the full trace sees) differ as for Swin v1; the counts do not
    assert_derived_equals_full(spec, also_drop={"free_ops", "free_why"})


@pytest.mark.slow
@pytest.mark.parametrize("name, want", [("swinv2_tiny_window8_256", 5_962_300_416),
                                        ("swinv2_cr_tiny_224", 4_658_555_904)])
def test_full_size_flops(name, want):
    spec, full, theirs = assert_flops_match_fvcore(name)
    assert full.flops == want and theirs - want == (0 if "_cr_" not in name else 768 * 49)
    assert analyze(spec, method="derived").flops == full.flops


def test_what_timm_cannot_take_is_refused():
    data = spec_from_timm("swinv2_cr_huge_224", **SMALL["swinv2_cr_huge_224"]).model_dump(mode="json")
    moved = {**data, "layers": [*data["layers"], {"at": "3", "block": {"name": "respostnorm_norm3"}}]}
    with pytest.raises(SpecError, match="blocks with norm3"):
        timm_kwargs(load_spec(moved))
    with pytest.raises(SpecError, match="a final norm"):
        timm_kwargs(load_spec({**data, "final_norm": True}))
    v2 = spec_from_timm("swinv2_tiny_window8_256", **SMALL["swinv2_tiny_window8_256"]).model_dump(mode="json")
    with pytest.raises(SpecError, match="no final norm"):
        timm_kwargs(load_spec({**v2, "final_norm": False}))
    with pytest.raises(SpecError, match="qkv_bias qv or false"):
        timm_kwargs(load_spec({**v2, "attention": {**v2["attention"], "params": {**v2["attention"]["params"],
                                                                                "qkv_bias": True}},
                               "layers": [{"at": "1-5:2", "attention": {"params": {"shift": 1}}}]}))
