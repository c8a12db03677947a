"""timm's NaFlexVit family (issue 12): what its models read as, what vitlab cannot express refused
by name, its weights in timm's own layout, and the round trip of a table off the image grid.

References are timm's own models; every timm model is built with ``pretrained=False``, the reading
tests on the meta device. Coverage, outputs, FLOPs, derived counts and the round trip of the family are checked with every
other family's in ``test_zoo_coverage.py`` and ``test_timm_parity.py``; here, what is its own.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_kwargs, zoo  # noqa: E402
from timm_reference import assert_round_trip, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

SMALL = dict(depth=2, embed_dim=64, num_heads=2)


# --- reading, on the meta device ------------------------------------------------------------------

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


# --- timm's weights, loaded -------------------------------------------------------------------------

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


# --- back to timm: what it cannot hold ----------------------------------------------------------------

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
