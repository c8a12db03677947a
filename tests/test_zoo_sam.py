"""timm's ``vision_transformer_sam`` family (Segment Anything's image encoder; issue 12): every model
read, outputs equal to timm's after loading its weights (windowed and global blocks with decomposed
relative position, padded windows, the conv neck), FLOPs equal to fvcore's on timm's own unfused
model, derived counts equal to full ones, and a round trip back to timm.

References are timm's own outputs and fvcore on timm's model; every timm model is built with
``pretrained=False`` (reading on the meta device).
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_kwargs  # noqa: E402
from timm_reference import assert_derived_equals_full, assert_family_reads  # noqa: E402
from timm_reference import assert_flops_match_fvcore, assert_outputs_match_timm  # noqa: E402
from timm_reference import assert_round_trip, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

FAMILY = "vision_transformer_sam"
SMALL = dict(embed_dim=64, num_heads=2)
# an 8 x 8 grid in 3 x 3 windows: SAM pads it to 9 x 9; block 1 attends globally
PADDED = dict(SMALL, depth=3, img_size=128, window_size=3, global_attn_indexes=[1])
COMPARED = {
    "samvit_base_patch16": dict(PADDED, neck_chans=32),  # conv neck, learned position table
    "samvit_base_patch16_224": dict(SMALL, depth=2, img_size=64, window_size=2, global_attn_indexes=[0]),  # no
    # position table, the neck is one LayerNorm, a classifier
    "samvit_large_patch16": dict(PADDED, num_classes=10, qk_norm=True, init_values=0.1),
}


def test_every_sam_model_reads():
    assert_family_reads(FAMILY, total=4)


def test_sam_reads_windows_global_blocks_and_the_neck():
    spec = spec_from_timm("samvit_base_patch16")  # on meta: 1024 px, 14 x 14 windows, global at 2, 5, 8, 11
    assert spec.attention.name == "window_decomposed" and spec.attention.params["window_size"] == 14
    assert [(layer.at, layer.attention.name) for layer in spec.layers] == [("2,5,8,11", "mhsa_decomposed")]
    assert spec.pool.name == "sam_neck" and spec.pool.params["channels"] == 256 and not spec.class_token
    assert not spec.final_norm and spec.num_classes == 0
    with pytest.raises(SpecError, match="rotary position embedding"):
        spec_from_timm("samvit_base_patch16", use_rel_pos=False, use_rope=True, img_size=64, depth=1)


@pytest.mark.parametrize("name", COMPARED)
def test_outputs_match_timm(name):
    assert_outputs_match_timm(randomize(timm.create_model(name, pretrained=False, **COMPARED[name])).eval())


def test_position_table_loads_as_rows_and_resamples():
    """SAM's (1, gh, gw, D) table is the learned table's rows; another grid is resampled as timm does."""
    kw = dict(SMALL, depth=1, window_size=2, global_attn_indexes=[0])
    tm = randomize(timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, **kw))
    model = build_model(spec_from_timm("samvit_base_patch16", img_size=96, **kw))
    report = load_timm_weights(model, tm.state_dict(), strict=False)
    assert report.resampled == ["pos_embed.weight"]
    # the global block's decomposed tables are sized by the grid: reported, not resampled
    assert [k for k, _, _ in report.mismatched] == ["blocks.0.attn.rel_pos_h", "blocks.0.attn.rel_pos_w"]
    small = build_model(spec_from_timm(tm))
    assert load_timm_weights(small, tm).ok
    assert torch.equal(small.pos_embed.weight.detach(), tm.pos_embed.detach().flatten(1, 2))


# --- FLOPs equal fvcore's on timm's own model (unfused attention) ------------------------------------

FLOPS = {
    "samvit_base_patch16": dict(PADDED, neck_chans=32),
    "samvit_base_patch16_224": dict(depth=2),  # full width at 224 px, 14 x 14 windows = the grid
}


@pytest.mark.parametrize("name", FLOPS)
def test_flops_equal_fvcore_on_timm(name):
    assert_flops_match_fvcore(name, **FLOPS[name])


def test_derived_equals_full():
    assert_derived_equals_full(spec_from_timm("samvit_base_patch16", **PADDED))


# --- back to timm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["samvit_base_patch16", "samvit_base_patch16_224"])
def test_round_trip_through_timm(name):
    assert_round_trip(spec_from_timm(name, **COMPARED[name]))


def test_export_refuses_what_sam_cannot_hold():
    data = spec_from_timm("samvit_base_patch16", **PADDED).to_dict()
    with pytest.raises(SpecError, match="prefix tokens"):
        timm_kwargs({**data, "class_token": True})
    with pytest.raises(SpecError, match="relative position in all blocks or none"):
        timm_kwargs({**data, "layers": [{"at": 1, "attention": {"name": "mhsa"}}]})
