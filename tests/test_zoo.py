"""timm's isotropic ViT zoo (issue 12): which models ``spec_from_timm`` reads, that every other one
is refused with a vitlab error naming the feature, and per family added (DeiT distilled, BEiT-3's
sub-LN, EVA: EVA-02, DINOv3, Perception Encoder, ``vit_*_rope_*``; BEiT and relpos: relative
position biases) outputs equal to timm's after loading its weights, FLOPs equal to fvcore's on
timm's own unfused model, derived counts equal to full ones, and a round trip where timm can take
the spec back.

Every timm model is built with ``pretrained=False``; the reading tests build on the meta device.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vitlab  # noqa: E402
from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_kwargs, zoo  # noqa: E402
from timm_reference import assert_close, assert_derived_equals_full, assert_family_reads  # noqa: E402
from timm_reference import assert_flops_match_fvcore, assert_outputs_match_timm  # noqa: E402
from timm_reference import assert_round_trip, outputs, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")


# --- reading, on the meta device ------------------------------------------------------------------

# what each added family still refuses, and why (the rest of the family reads)
REFUSED = {
    "beit": {},
    "deit": {},
    "eva": {},
    "vision_transformer": {},
    "vision_transformer_relpos": {},
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_reads_all_but_the_named_refusals(family):
    assert_family_reads(family, REFUSED[family])


def test_vision_transformer_family_reads_beit3_and_cropping_siglip():
    names = ["beit3_base_patch16_224", "beit3_giant_patch14_336", "vit_so400m_patch14_siglip_384"]
    (cov,) = zoo.coverage(["vision_transformer"], names=names)
    assert [o.kind for o in cov.outcomes] == ["read"] * 3, [o.reason for o in cov.outcomes]
    assert spec_from_timm("beit3_base_patch16_224").attention.name == "mhsa_subln"
    siglip = spec_from_timm("vit_so400m_patch14_siglip_384")  # 384 px in 14 px patches: timm crops to 27 x 27
    assert siglip.patch_embed.params["stride"] == 14 and siglip.build_context().grid_size == (27, 27)


def _one_per_family() -> list[str]:
    return [timm.list_models(module=f)[0] for f in zoo.families() if timm.list_models(module=f)]


def test_every_refusal_is_a_vitlab_error_naming_the_feature():
    """One model of every family (and the two families' refusals above): a clean SpecError, never a crash."""
    for name in _one_per_family():
        family = next(f for f in zoo.families() if name in timm.list_models(module=f))
        outcome = zoo.read_one(name, family)
        assert outcome.kind in ("read", "refused"), (name, outcome.kind, outcome.reason)
        if outcome.kind == "refused":
            with pytest.raises(SpecError) as info:
                spec_from_timm(zoo.meta_model(name))
            assert f"timm model '{name}'" in str(info.value)
            assert outcome.reason and outcome.reason in str(info.value)


def test_markdown_table_lists_families_and_totals():
    table = zoo.coverage(["deit"])
    text = zoo.markdown(table)
    assert "| `deit` | 16 / 16 |" in text and "**16 / 16**" in text and timm.__version__ in text


# --- outputs equal timm's, after loading timm's weights --------------------------------------------

SMALL = dict(depth=2, embed_dim=64, num_heads=2)
COMPARED = {  # name -> create_model kwargs (full size where a forward is fast)
    "deit_tiny_distilled_patch16_224": {},
    "deit_small_distilled_patch16_224": dict(depth=2, img_size=96),
    "beit3_base_patch16_224": dict(SMALL, img_size=64),
    "vit_large_patch14_reg4_dinov2": dict(SMALL, img_size=56),  # unchanged family, as a control
    "eva02_tiny_patch14_224": {},
    "eva02_base_patch16_clip_224": dict(SMALL, img_size=64),  # sub-LN, separate q/k/v, SwiGLU with norm
    "eva02_enormous_patch14_clip_224": dict(SMALL, img_size=56),  # res-post-norm blocks
    "vit_small_patch16_dinov3": dict(depth=2, img_size=96),  # DINOv3 RoPE, registers, layer scale
    "vit_small_plus_patch16_dinov3_qkvb": dict(depth=2, img_size=64),  # EVA's fused q/v bias, SwiGLU
    "vit_pe_core_tiny_patch16_384": dict(depth=2, img_size=64),  # attention pool over every token
    "vit_base_patch16_rope_ape_224": dict(SMALL, img_size=64),  # RoPE plus a learned table
    "vit_pe_spatial_tiny_patch16_512": dict(depth=2, img_size=64),  # pre-norm, bias-free patch conv
    "beit_base_patch16_224": dict(SMALL, img_size=64),  # per-block relative position table, q / v bias
    "beitv2_large_patch16_224": dict(SMALL, img_size=(64, 48)),  # the table on a non-square grid
    "beit_large_patch16_512": dict(SMALL, img_size=64, global_pool="token"),  # final norm, class token
    "test_vit_relpos": {},  # per-block bias MLP over log-spaced offsets, fc_norm
    "vit_relpos_medium_patch16_cls_224": dict(SMALL, img_size=(64, 48)),  # class token: its bias rows are zero
    "vit_srelpos_small_patch16_224": dict(SMALL, img_size=64, rel_pos_dim=32),  # one bias MLP for all blocks
    "vit_relpos_base_patch16_rpn_224": dict(SMALL, img_size=64),  # res-post-norm blocks
}


@pytest.mark.parametrize("name", COMPARED)
def test_outputs_match_timm(name):
    assert_outputs_match_timm(randomize(timm.create_model(name, pretrained=False, **COMPARED[name])).eval())


def test_dinov3_at_other_image_sizes():
    """DINOv3 reads dynamic_img_size: RoPE recomputed for the new grid, as timm does."""
    tm = randomize(timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=1, img_size=64)).eval()
    other = torch.randn(1, 3, 80, 48, generator=torch.Generator().manual_seed(2))
    model, _ = assert_outputs_match_timm(tm, weights=tm, inputs=lambda spec: other)
    assert model.spec.dynamic_img_size


def test_eva_weights_are_fused_and_renamed():
    tm = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, **SMALL, img_size=64)
    model = build_model(spec_from_timm(tm))
    report = load_timm_weights(model, tm)
    assert report.ok
    assert "blocks.0.attn.qkv.weight" in report.loaded + report.converted
    with torch.no_grad():  # the key bias timm keeps at zero outside its state dict
        assert torch.count_nonzero(model.blocks[0].attn.qkv.bias[64:128]) == 0


def test_beit_weights_and_grid():
    """BEiT's q / v biases fuse with a zero key bias, its tables load under timm's name, and the
    table tied to the patch grid refuses what it cannot serve."""
    tm = randomize(timm.create_model("beit_base_patch16_224", pretrained=False, **SMALL, img_size=64))
    spec = spec_from_timm(tm)
    assert spec.attention.name == "mhsa_relpos" and not spec.dynamic_img_size
    model = build_model(spec)
    report = load_timm_weights(model, tm)
    assert report.ok, str(report)
    attn = model.blocks[1].attn
    with torch.no_grad():
        assert torch.count_nonzero(attn.qkv.bias[64:128]) == 0
        assert torch.equal(attn.qkv.bias[:64], tm.blocks[1].attn.q_bias)
        assert torch.equal(attn.relative_position_bias_table, tm.blocks[1].attn.relative_position_bias_table)
    data = spec.to_dict()
    with pytest.raises(SpecError, match="tied to the patch grid"):
        vitlab.load_spec({**data, "dynamic_img_size": True})
    with pytest.raises(SpecError, match="one prefix token"):
        vitlab.load_spec({**data, "reg_tokens": 1})
    with pytest.raises(SpecError, match="shared by all blocks"):
        spec_from_timm("beit_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True)


@pytest.mark.parametrize("name, kw", [
    ("vit_relpos_medium_patch16_cls_224", dict(SMALL, rel_pos_dim=32)),
    ("vit_srelpos_small_patch16_224", dict(SMALL, rel_pos_dim=32)),
    ("vit_relpos_small_patch16_224", dict(SMALL, rel_pos_type="bias", class_token=True, global_pool="token")),
])
def test_relpos_weights_and_other_grids(name, kw):
    """timm's relpos bias modules load under vitlab's names; the bias MLP follows another grid
    (with dynamic_img_size, as timm's ``set_input_size``), the table refuses it."""
    tm = randomize(timm.create_model(name, pretrained=False, img_size=64, **kw)).eval()
    spec = spec_from_timm(tm)
    model = build_model(spec)
    assert load_timm_weights(model, tm).ok
    if spec.attention.name == "mhsa_relpos":
        with pytest.raises(SpecError, match="tied to the patch grid"):
            vitlab.load_spec({**spec.to_dict(), "dynamic_img_size": True})
        return
    model = build_model(vitlab.load_spec({**spec.to_dict(), "dynamic_img_size": True}))
    assert load_timm_weights(model, tm).ok
    other = timm.create_model(name, pretrained=False, img_size=(80, 48), **kw).eval()
    other.load_state_dict(tm.state_dict())
    x = torch.randn(2, 3, 80, 48, generator=torch.Generator().manual_seed(2))
    assert_close(outputs(model, x), outputs(other, x))


# --- FLOPs equal fvcore's on timm's own model (unfused attention) ------------------------------------

FLOPS = {
    "deit_tiny_distilled_patch16_224": {},
    "deit_small_distilled_patch16_224": dict(depth=2),
    "beit3_base_patch16_224": dict(depth=1),
    "eva02_tiny_patch14_224": {},
    "vit_small_patch16_dinov3": dict(depth=2),
    "vit_pe_core_tiny_patch16_384": dict(depth=2),
    "beit_base_patch16_224": dict(depth=1),
    "beitv2_large_patch16_224": dict(depth=1),
    "test_vit_relpos": {},
    "vit_relpos_medium_patch16_cls_224": dict(depth=1),
    "vit_srelpos_small_patch16_224": dict(depth=2),
}


@pytest.mark.parametrize("name", FLOPS)
def test_flops_equal_fvcore_on_timm(name):
    assert_flops_match_fvcore(name, **FLOPS[name])


@pytest.mark.parametrize("name, kw", [
    ("beit_base_patch16_224", dict(depth=2, img_size=64)),
    ("test_vit_relpos", dict(depth=3)),
    ("vit_relpos_medium_patch16_cls_224", dict(depth=2, img_size=64)),
    ("vit_srelpos_small_patch16_224", dict(depth=2, img_size=64)),  # a bias computed once, in the embedding
])
def test_derived_equals_full(name, kw):
    assert_derived_equals_full(spec_from_timm(name, **kw))


# --- back to timm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kw", [
    ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64)),
    ("deit_base_distilled_patch16_384", dict(SMALL, img_size=64, num_classes=0)),
    ("beit3_base_patch16_224", dict(SMALL, img_size=64)),
])
def test_round_trip_through_timm(name, kw):
    assert_round_trip(spec_from_timm(name, **kw))


def test_distilled_export_refuses_what_deit_cannot_hold():
    spec = spec_from_timm("deit_tiny_distilled_patch16_224", depth=1)
    data = spec.to_dict()
    data["pos_embed"] = {"name": "learned", "params": {"include_prefix": False}}
    with pytest.raises(SpecError, match="distillation token without its position row"):
        timm_kwargs(data)
