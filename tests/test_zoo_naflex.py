"""timm's NaFlexVit family (issue 12): every ``naflexvit_*`` model read, what vitlab cannot express
refused by name, and with image input: outputs (and the embedding itself) equal to timm's after
loading its weights, at the default size and at others (the position table resampled, aspect
preserving or not), FLOPs equal to fvcore's on timm's own unfused model, derived counts equal to
full ones, and a round trip back to timm's NaFlexVit.

References are timm's own outputs and fvcore on timm's model; every timm model is built with
``pretrained=False``, the reading tests on the meta device.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_kwargs, zoo  # noqa: E402
from timm_reference import assert_close, assert_derived_equals_full, assert_family_reads  # noqa: E402
from timm_reference import assert_flops_match_fvcore, assert_outputs_match_timm  # noqa: E402
from timm_reference import assert_round_trip, images, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

SMALL = dict(depth=2, embed_dim=64, num_heads=2)
OTHER_SIZES = [(80, 48), (96, 160)]  # non-square grids: aspect-preserving resampling crops


# --- reading, on the meta device ------------------------------------------------------------------

def test_every_naflexvit_is_read():
    assert_family_reads("naflexvit", total=14)


def test_specs_say_what_naflexembeds_does():
    """The registered settings, as NaFlexVitCfg spells them in timm/models/naflexvit.py."""
    siglip = spec_from_timm("naflexvit_so400m_patch16_siglip")
    assert siglip.patch_embed.name == "naflex" and siglip.dynamic_img_size and siglip.img_hw == (384, 384)
    assert siglip.pos_embed.params == {"grid": 16, "factorized": False, "mode": "bilinear", "antialias": True,
                                       "align_corners": False, "ar_preserving": False}
    assert siglip.pool.name == "map" and siglip.mlp.params["act"] == "gelu_tanh"
    parfac = spec_from_timm("naflexvit_base_patch16_parfac_gap")
    assert parfac.pos_embed.params["factorized"] and parfac.pos_embed.params["ar_preserving"]
    assert (parfac.class_token, parfac.reg_tokens, parfac.pool.name) == (False, 4, "avg")
    radio = spec_from_timm("naflexvit_base_patch16_radio_v3")  # C-RADIOv3-B: align_corners, 128 x 128 table
    assert radio.pos_embed.params == {"grid": 128, "factorized": False, "mode": "bilinear", "antialias": False,
                                      "align_corners": True, "ar_preserving": True}
    assert (radio.class_token, radio.reg_tokens, radio.pool.name, radio.final_norm) == (True, 7, "token", False)
    conv = spec_from_timm("naflexvit_base_patch16_gap", embed_proj_type="conv", pos_embed="none")
    assert (conv.patch_embed.name, conv.pos_embed.name) == ("conv", "none")
    chw = spec_from_timm("naflexvit_base_patch16_gap", patchify_channels_last=False)
    assert chw.patch_embed.name == "linear"


@pytest.mark.parametrize("kw, feature", [
    (dict(rope_type="axial"), "rotary position embedding"),
    (dict(swiglu_mlp=True), "EVA-style block"),
    (dict(attn_only_layer_scale=True), "EVA-style block"),
    (dict(global_pool="avgmax"), "global_pool 'avgmax'"),
    (dict(patch_drop_rate=0.1), "patch dropout"),
    (dict(pos_embed_interp_mode="nearest"), "mode 'nearest'"),
    (dict(pool_include_prefix=True), "average pooling over prefix tokens"),
])
def test_what_vitlab_cannot_express_is_refused_by_name(kw, feature):
    with pytest.raises(SpecError, match=feature) as info:
        spec_from_timm(zoo.meta_model("naflexvit_base_patch16_gap", **kw))
    assert "timm model 'naflexvit_base_patch16_gap'" in str(info.value)


# --- outputs equal timm's, after loading timm's weights --------------------------------------------

COMPARED = {  # name -> create_model kwargs; a small table grid so every image size resamples it
    "naflexvit_base_patch16_gap": dict(SMALL, pos_embed_grid_size=(6, 5)),  # bicubic, antialiased
    "naflexvit_base_patch16_parfac_gap": dict(SMALL, pos_embed_grid_size=(6, 5)),  # factorized, aspect kept
    "naflexvit_base_patch16_siglip": dict(SMALL),  # bilinear, attention pool, gelu_tanh
    "naflexvit_base_patch16_radio_v3": dict(SMALL),  # 128 x 128 table, align_corners, class token
    "naflexvit_so150m2_patch16_reg1_map": dict(SMALL),  # no qkv bias, one register
    # the other projections: a conv with a norm after it and pre_norm (bias-free); (C, ph, pw) patches
    "naflexvit_base_patch16_map": dict(SMALL, embed_proj_type="conv", embed_norm_layer="layernorm", pre_norm=True),
    "naflexvit_so150m2_patch16_reg1_gap": dict(SMALL, patchify_channels_last=False, class_token=True,
                                               global_pool="token", dynamic_img_pad=True),
    # a classic ViT built as NaFlexVit: the table on the image's grid, the class token pooled
    "vit_base_patch16_224": dict(SMALL, use_naflex=True, img_size=64),
}


def sized_images(spec) -> list[torch.Tensor]:
    """Images at the spec's size and at ``OTHER_SIZES`` (and, where patches are padded, one not
    made of whole patches)."""
    hw = [spec.img_hw, *OTHER_SIZES] + ([(90, 50)] if spec.patch_embed.params["pad"] else [])
    return [torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in hw]


@pytest.mark.parametrize("name", COMPARED)
def test_outputs_match_timm(name):
    tm = randomize(timm.create_model(name, pretrained=False, **COMPARED[name])).eval()
    model, _ = assert_outputs_match_timm(tm, inputs=sized_images)
    for x in sized_images(model.spec):
        # the tokens entering the first block: a wrong position table shows here far above the
        # tolerance, while in the logits it may drown under the blocks
        with torch.no_grad():
            ours, theirs = model.embed(x)[0], tm.norm_pre(tm.embeds(x)[0])
        assert_close(ours, theirs, rtol=1e-6)


def test_weights_keep_timms_layout():
    """The bridge only renames: NaFlex's (ph, pw, C) projection and its (1, rows, cols, D) table
    load as they are."""
    tm = randomize(timm.create_model("naflexvit_base_patch16_radio_v3", pretrained=False, **SMALL))
    model = build_model(spec_from_timm(tm))
    report = load_timm_weights(model, tm)
    assert report.ok and not report.converted and not report.resampled, str(report)
    with torch.no_grad():
        assert torch.equal(model.patch_embed.proj.weight, tm.embeds.proj.weight)
        assert torch.equal(model.pos_embed.weight, tm.embeds.pos_embed)
        assert torch.equal(model.reg_token, tm.embeds.reg_token)


# --- FLOPs equal fvcore's on timm's own model (unfused attention) ------------------------------------

FLOPS = {  # full width at the default size (384 / 512 px), one block
    "naflexvit_base_patch16_gap": dict(depth=1),  # bicubic resampling: vitlab counts it, fvcore does not
    "naflexvit_base_patch16_parfac_gap": dict(depth=1),
    "naflexvit_base_patch16_siglip": dict(depth=1),
    "naflexvit_base_patch16_radio_v3": dict(depth=1),
}


@pytest.mark.parametrize("name", FLOPS)
def test_flops_equal_fvcore_on_timm(name):
    assert_flops_match_fvcore(name, **FLOPS[name])


@pytest.mark.parametrize("name, kw", [
    ("naflexvit_base_patch16_par_gap", dict(SMALL, depth=3)),
    ("naflexvit_base_patch16_parfac_gap", dict(SMALL, depth=3)),
    ("naflexvit_so150m2_patch16_reg1_map", dict(SMALL, depth=3)),
])
def test_derived_equals_full(name, kw):
    assert_derived_equals_full(spec_from_timm(name, **kw))


# --- back to timm ----------------------------------------------------------------------------------

ROUND_TRIP = {  # a table on the default image's grid, which timm then derives from img_size (and keeps)
    "naflexvit_base_patch16_gap": dict(SMALL, pos_embed_grid_size=(24, 24)),
    "naflexvit_base_patch16_parfac_gap": dict(SMALL, pos_embed_grid_size=(24, 24)),
    "naflexvit_base_patch16_radio_v3": dict(SMALL, pos_embed_grid_size=(32, 32)),
    "naflexvit_base_patch16_siglip": dict(SMALL, pos_embed_grid_size=(24, 24), embed_proj_type="conv",
                                          embed_norm_layer="layernorm", pre_norm=True),
    "naflexvit_base_patch16_map": dict(SMALL, pos_embed_grid_size=(24, 24), patchify_channels_last=False),
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_through_timm(name):
    other = torch.randn(1, 3, 80, 48, generator=torch.Generator().manual_seed(3))
    assert_round_trip(spec_from_timm(name, **ROUND_TRIP[name]), inputs=lambda spec: (images(spec), other),
                      timm_cls="NaFlexVit")


def test_round_trip_of_a_table_off_the_image_grid_keeps_outputs_not_img_size():
    """timm keeps no image size beside a table grid: the spec comes back with the table's grid in pixels."""
    spec = spec_from_timm("naflexvit_base_patch16_gap", **SMALL, pos_embed_grid_size=(6, 5))
    back = assert_round_trip(spec, exclude={"name", "img_size"})
    assert back.img_hw == (96, 80)


def test_export_refuses_what_naflexvit_cannot_hold():
    data = spec_from_timm("naflexvit_base_patch16_gap", depth=1).to_dict()
    data["pos_embed"] = {"name": "learned", "params": {"include_prefix": False}}
    with pytest.raises(SpecError, match="position encoding 'learned'"):
        timm_kwargs(data)
    data = spec_from_timm("naflexvit_base_patch16_gap", depth=1).to_dict()
    data["block"] = {"name": "parallel", "params": {}}
    with pytest.raises(SpecError, match="parallel block"):
        timm_kwargs(data)
