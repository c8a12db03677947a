"""The last models of the families vitlab already read (issue 12): RoPE-Mixed's learned per-block
frequencies and Sapiens2 (``eva``), timm's ``ParallelThingsBlock`` and differential attention
(``vision_transformer``).

References are timm's own: its models' outputs after ``load_timm_weights`` (weights randomised by
``timm_reference.randomize``), fvcore on timm's unfused model for FLOPs, timm's models built from
``timm_kwargs`` for the round trip. Derived counts are compared with vitlab's full trace (their
definition). Every timm model is built with ``pretrained=False``; reading tests build on meta.
"""
from __future__ import annotations

import functools

import pytest
import torch

timm = pytest.importorskip("timm")

from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_kwargs, zoo  # noqa: E402
from timm_reference import assert_close, assert_derived_equals_full, assert_family_reads  # noqa: E402
from timm_reference import assert_flops_match_fvcore, assert_outputs_match_timm  # noqa: E402
from timm_reference import assert_round_trip, images, outputs, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

MIXED = [f"vit_{s}_patch16_rope_mixed{ape}_224" for s in ("small", "base", "large") for ape in ("", "_ape")]
SAPIENS2 = [f"vit_{s}_patch16_sapiens2" for s in ("base", "large", "huge", "giant", "5b")]
PARALLEL_THINGS = ["vit_small_patch16_18x2_224", "vit_base_patch16_18x2_224"]
DIFFERENTIAL = ["vit_dwee_patch16_reg1_gap_256", "vit_dlittle_patch16_reg1_gap_256", "vit_dpwee_patch16_reg1_gap_256"]


# --- reading, on the meta device ------------------------------------------------------------------

@pytest.mark.parametrize("family, names", [("eva", MIXED + SAPIENS2),
                                           ("vision_transformer", PARALLEL_THINGS + DIFFERENTIAL)])
def test_the_last_refused_models_read(family, names):
    assert_family_reads(family, names=names)  # timm still has them all, and all read


def test_what_the_new_models_read_as():
    mixed = spec_from_timm(zoo.meta_model("vit_small_patch16_rope_mixed_ape_224"))
    assert mixed.pos_embed.params["variant"] == "mixed" and mixed.pos_embed.params["learned"]
    # Sapiens2-1B: grouped-query attention in all but the first and last 8 of its 40 blocks
    giant = spec_from_timm(zoo.meta_model("vit_giant_patch16_sapiens2"))
    assert giant.block.params == {"init_values": 1.0, "attn_only_layer_scale": True}
    assert giant.attention.params["kv_heads"] is None and giant.norm.name == "rmsnorm" and giant.reg_tokens == 8
    assert [(layer.at, layer.attention.params["kv_heads"]) for layer in giant.layers] == [("8-31", 12)]
    things = spec_from_timm(zoo.meta_model("vit_base_patch16_18x2_224"))
    assert things.block.name == "parallel_branches" and things.block.params["branches"] == 2
    assert spec_from_timm(zoo.meta_model("vit_dwee_patch16_reg1_gap_256")).attention.name == "mhsa_diff"
    dp = spec_from_timm(zoo.meta_model("vit_dpwee_patch16_reg1_gap_256"))
    assert (dp.block.name, dp.attention.name) == ("parallel", "mhsa_diff")


# --- outputs equal timm's, after loading timm's weights --------------------------------------------

SMALL = dict(depth=2, embed_dim=64, num_heads=2)
THREE_THINGS = functools.partial(timm.models.vision_transformer.ParallelThingsBlock, num_parallel=3)
COMPARED = [  # (name, create_model kwargs)
    ("vit_small_patch16_rope_mixed_224", dict(SMALL, img_size=64)),
    ("vit_base_patch16_rope_mixed_ape_224", dict(depth=3, embed_dim=64, num_heads=4, img_size=(64, 48))),
    # Sapiens2: per-block kv heads (the q / k / v parts differ in size), attention-only layer scale
    ("vit_base_patch16_sapiens2", dict(depth=3, embed_dim=64, num_heads=4, num_kv_heads=(4, 2, 4), img_size=(64, 48))),
    ("vit_large_patch16_sapiens2", dict(depth=4, embed_dim=96, num_heads=4, num_kv_heads=(4, 1, 2, 4), img_size=64)),
    ("vit_small_patch16_18x2_224", dict(SMALL, img_size=64)),
    ("vit_base_patch16_18x2_224", dict(SMALL, img_size=64, qkv_bias=False, block_fn=THREE_THINGS)),
    ("vit_dwee_patch16_reg1_gap_256", dict(depth=3, img_size=64)),  # λ_init differs per block
    ("vit_dlittle_patch16_reg1_gap_256", dict(depth=2, img_size=64, qk_norm=True, scale_attn_norm=True)),
    ("vit_dpwee_patch16_reg1_gap_256", dict(depth=2, img_size=64)),  # fused out_proj of both branches
    ("vit_dpwee_patch16_reg1_gap_256", dict(depth=2, img_size=64, qkv_bias=False, qk_norm=True)),  # mlp_bias, q_norm
    ("vit_base_patch16_18x2_224", dict(SMALL, img_size=64, attn_layer="diff")),  # both at once
]


@pytest.mark.parametrize("name, kw", COMPARED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(COMPARED)])
def test_outputs_match_timm(name, kw):
    assert_outputs_match_timm(randomize(timm.create_model(name, pretrained=False, **kw)).eval())


def test_mixed_rope_rotates_each_block_with_its_own_frequencies():
    """timm's outputs are only matched when block i rotates with ``freqs[:, i]``: the blocks'
    frequencies swapped, they are not."""
    tm = randomize(timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False, **SMALL, img_size=64)).eval()
    model = build_model(spec_from_timm(tm))
    assert load_timm_weights(model, tm).ok
    x = images(model.spec)
    with torch.no_grad():
        model.pos_embed.freqs.copy_(model.pos_embed.freqs.flip(1))
    with pytest.raises(AssertionError, match="max abs difference"):
        assert_close(outputs(model, x), outputs(tm, x))
    with pytest.raises(ValueError, match="needs the block index"):
        model.pos_embed.qk_transform(model.grid_size)(torch.zeros(1, 2, 17, 32), torch.zeros(1, 2, 17, 32))


def test_sapiens2_at_another_image_size():
    """Sapiens2 reads dynamic_img_size: its DINOv3 RoPE follows the grid, as timm's does."""
    kw = dict(depth=2, embed_dim=64, num_heads=4, num_kv_heads=(4, 2), img_size=64)
    tm = randomize(timm.create_model("vit_huge_patch16_sapiens2", pretrained=False, **kw)).eval()
    other = torch.randn(1, 3, 80, 48, generator=torch.Generator().manual_seed(2))
    model, _ = assert_outputs_match_timm(tm, weights=tm, inputs=lambda spec: other)
    assert model.spec.dynamic_img_size


# --- FLOPs equal fvcore's on timm's own model (unfused attention) ------------------------------------

FLOPS = {
    "vit_small_patch16_rope_mixed_224": dict(depth=2),
    "vit_base_patch16_rope_mixed_ape_224": dict(depth=1),
    "vit_base_patch16_sapiens2": dict(depth=2, num_kv_heads=(12, 6), img_size=(128, 96)),
    "vit_large_patch16_sapiens2": dict(depth=2, num_kv_heads=(8, 16), img_size=(96, 64)),
    "vit_small_patch16_18x2_224": dict(depth=1),
    "vit_base_patch16_18x2_224": dict(depth=1, img_size=112),
    "vit_dwee_patch16_reg1_gap_256": dict(depth=2),
    "vit_dlittle_patch16_reg1_gap_256": dict(depth=1, img_size=128),
    "vit_dpwee_patch16_reg1_gap_256": dict(depth=2),
}


@pytest.mark.parametrize("name", FLOPS)
def test_flops_equal_fvcore_on_timm(name):
    assert_flops_match_fvcore(name, **FLOPS[name])


@pytest.mark.parametrize("name, kw", [
    ("vit_small_patch16_rope_mixed_224", dict(depth=3, img_size=64)),  # per-block tables made in each block
    ("vit_small_patch16_18x2_224", dict(depth=2, img_size=64)),
    ("vit_dwee_patch16_reg1_gap_256", dict(depth=3, img_size=64)),  # blocks differ in λ_init only
    ("vit_dpwee_patch16_reg1_gap_256", dict(depth=2, img_size=64)),
])
def test_derived_equals_full(name, kw):
    assert_derived_equals_full(spec_from_timm(name, **kw))


def test_derived_equals_full_on_sapiens2_blocks():
    """Sapiens2's per-block kv heads (``layers``) and attention-only layer scale count alike both
    ways, every key included: its DINOv3 RoPE tables, built once in the embedding, are counted by
    the derived trace too (the piece returns the tensors its q/k transform closes over)."""
    spec = spec_from_timm("vit_large_patch16_sapiens2", depth=4, num_kv_heads=(16, 8, 4, 16), img_size=64)
    assert len(spec.layers) == 2
    assert_derived_equals_full(spec)


# --- back to timm (timm's VisionTransformer) --------------------------------------------------------

def one_layer_scale_if_parallel(model):
    """timm's parallel blocks have one layer scale for both branches: the vitlab model's two made equal."""
    if model.spec.block.name == "parallel":
        with torch.no_grad():
            for block in model.blocks:
                block.ls2.gamma.copy_(block.ls1.gamma)


@pytest.mark.parametrize("name, kw", [
    ("vit_small_patch16_18x2_224", dict(SMALL, img_size=64)),
    ("vit_base_patch16_18x2_224", dict(SMALL, img_size=64, mlp_layer=timm.layers.SwiGLU, act_layer="silu",
                                       attn_layer="diff", block_fn=THREE_THINGS)),
    ("vit_dwee_patch16_reg1_gap_256", dict(depth=2, img_size=64, qk_norm=True, scale_attn_norm=True)),
    ("vit_dlittle_patch16_reg1_gap_256", dict(depth=2, img_size=64, proj_bias=False)),
    ("vit_dpwee_patch16_reg1_gap_256", dict(depth=2, img_size=64, qkv_bias=False, qk_norm=True)),
])
def test_round_trip_through_timm(name, kw):
    assert_round_trip(spec_from_timm(name, **kw), prepare=one_layer_scale_if_parallel)


def test_export_refuses_what_timm_vision_transformer_cannot_hold():
    data = spec_from_timm("vit_dwee_patch16_reg1_gap_256", depth=1, img_size=64).to_dict()
    attn_only = {"name": "prenorm", "params": {"init_values": 1.0, "attn_only_layer_scale": True}}
    with pytest.raises(SpecError, match="attention branch only"):
        timm_kwargs({**data, "block": attn_only})
    with pytest.raises(SpecError, match="dual_lambda"):
        timm_kwargs({**data, "attention": {"name": "mhsa_diff", "params": {"dual_lambda": True}}})
