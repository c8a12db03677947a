"""timm's ``eva`` family (issue 12): EVA-02, DINOv3, Perception Encoder, ``vit_*_rope_*``,
RoPE-Mixed's learned per-block frequencies and Sapiens2's grouped-query blocks: what they read as,
how their weights land (fused q / k / v, a key bias timm keeps at zero), other image sizes, weights
of each layout written back (``to_timm_state_dict``), and what timm's ``Eva`` cannot hold.

References are timm's own models and state dicts; every timm model is built with
``pretrained=False``, the reading tests on the meta device. Coverage, outputs, FLOPs, derived counts
and the round trip are checked with every other family's in ``test_zoo_coverage.py`` and
``test_timm_parity.py``.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vitlab  # noqa: E402
from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict  # noqa: E402
from vitlab.timm_interop import zoo  # noqa: E402
from timm_reference import assert_close, assert_outputs_match_timm, images, outputs, randomize  # noqa: E402
from timm_reference import with_changes  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

SMALL = dict(depth=2, embed_dim=64, num_heads=2)


# --- reading, on the meta device ------------------------------------------------------------------

def test_mixed_rope_and_sapiens2_read_as():
    mixed = spec_from_timm(zoo.meta_model("vit_small_patch16_rope_mixed_ape_224"))
    assert mixed.pos_embed.params["variant"] == "mixed" and mixed.pos_embed.params["learned"]
    # Sapiens2-1B: grouped-query attention in all but the first and last 8 of its 40 blocks
    giant = spec_from_timm(zoo.meta_model("vit_giant_patch16_sapiens2"))
    assert giant.block.params == {"init_values": 1.0, "attn_only_layer_scale": True}
    assert giant.attention.params["kv_heads"] is None and giant.norm.name == "rmsnorm" and giant.reg_tokens == 8
    assert [(layer.at, layer.attention.params["kv_heads"]) for layer in giant.layers] == [("8-31", 12)]


def test_sapiens2_grouped_query_sizes():
    """4 of Sapiens2's 5 sizes have grouped-query middle blocks (``layers``; the 0.1B has too few blocks)."""
    sapiens2 = [n for n in timm.list_models(module="eva") if n.endswith("_sapiens2")]
    assert sum(bool(spec_from_timm(zoo.meta_model(n)).layers) for n in sapiens2) == 4


# --- timm's weights, loaded -------------------------------------------------------------------------

def test_eva_weights_are_fused_and_renamed():
    tm = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, **SMALL, img_size=64)
    model = build_model(spec_from_timm(tm))
    report = load_timm_weights(model, tm)
    assert report.ok
    assert "blocks.0.attn.qkv.weight" in report.loaded + report.converted
    # the key bias timm keeps at zero outside its state dict is a zero buffer here too (qkv_bias: qv)
    assert model.spec.attention.params["qkv_bias"] == "qv"
    qkv = model.blocks[0].attn.qkv
    assert {"blocks.0.attn.qkv.q_bias", "blocks.0.attn.qkv.v_bias"} <= set(report.converted)
    assert "k_bias" not in dict(qkv.named_parameters()) and torch.count_nonzero(qkv.k_bias) == 0
    a = tm.blocks[0].attn  # q / k / v apart, k_proj without bias
    assert a.k_proj.bias is None
    assert torch.equal(qkv.q_bias, a.q_proj.bias) and torch.equal(qkv.v_bias, a.v_proj.bias)


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


@pytest.mark.parametrize("name, kw", [
    ("vit_small_patch16_dinov3", dict(depth=1, img_size=64)),  # RoPE recomputed for the new grid
    ("vit_huge_patch16_sapiens2", dict(depth=2, embed_dim=64, num_heads=4, num_kv_heads=(4, 2), img_size=64)),
])
def test_other_image_sizes(name, kw):
    """DINOv3 and Sapiens2 read dynamic_img_size: their RoPE follows the grid, as timm's does."""
    tm = randomize(timm.create_model(name, pretrained=False, **kw)).eval()
    other = torch.randn(1, 3, 80, 48, generator=torch.Generator().manual_seed(2))
    model, _ = assert_outputs_match_timm(tm, weights=tm, inputs=lambda spec: other)
    assert model.spec.dynamic_img_size


# --- back to timm: state-dict layouts -----------------------------------------------------------------

@pytest.mark.parametrize("name, kw", [
    ("eva02_base_patch16_clip_224", dict(SMALL, img_size=64)),  # q / k / v apart, EVA's q / v biases
    ("vit_small_patch16_dinov3_qkvb", dict(depth=2, img_size=64)),  # fused qkv, q_bias / v_bias
    # AttentionRope's q / k / v apart with a key bias, k / v smaller than q in the grouped-query block
    # (its SwiGLU's fc1 split, as the export builds it: the packed one is the weight loader's)
    ("vit_base_patch16_sapiens2", dict(depth=2, embed_dim=64, num_heads=4, num_kv_heads=(4, 1), img_size=32,
                                       swiglu_align_to=1)),
])
def test_weights_of_every_layout_go_back(name, kw):
    """Weights loaded from each of Eva's layouts (timm's tensors, perturbed) and written back with
    ``to_timm_state_dict`` load strictly into timm's class built from ``timm_kwargs`` and give the
    source model's outputs (the reference: timm's forward of the source model)."""
    tm = randomize(timm.create_model(name, pretrained=False, **kw)).eval()
    model = build_model(spec_from_timm(tm))
    assert load_timm_weights(model, tm).ok
    back = timm_class(model.spec)(**timm_kwargs(model.spec)).eval()
    back.load_state_dict(to_timm_state_dict(model), strict=True)
    x = images(model.spec)
    assert_close(outputs(back, x), outputs(tm, x))


@pytest.mark.parametrize("name", timm.list_models(module="eva"))
def test_every_eva_model_exports_timms_tensors(name):
    """Every model of timm's ``eva`` module (65 with timm 1.0.31), built on meta: ``to_timm_state_dict``
    fills exactly the tensors of timm's model built from ``timm_kwargs`` (an ``Eva``, or a
    ``VisionTransformer`` for EVA-01's models without RoPE), shape for shape. That this model reads
    back as the same spec is zoo coverage's *back to timm* (``test_zoo_coverage.py``)."""
    spec = spec_from_timm(zoo.meta_model(name))
    with zoo.on_meta():
        theirs = timm_class(spec)(**timm_kwargs(spec)).state_dict()
    ours = to_timm_state_dict(build_model(spec, device="meta"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


# --- back to timm: what it cannot hold ----------------------------------------------------------------

DINOV3 = ("vit_small_patch16_dinov3", dict(depth=2, img_size=64))
POST_NORM = ("vit_base_patch16_rope_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=64, use_post_norm=True))
SAPIENS2 = ("vit_base_patch16_sapiens2", dict(depth=3, embed_dim=64, num_heads=4, num_kv_heads=(4, 2, 4), img_size=32))


@pytest.mark.parametrize("base, changes, refusal", [
    (DINOV3, dict(layers=[{"at": "1", "mlp_ratio": 2.0}]), "timm Eva equivalent: per-block overrides"),
    # POST_NORM itself exports: only the grouped-query heads are refused
    (POST_NORM, dict(attention={"params": {"kv_heads": 2}}), "res-post-norm block with .* grouped-query attention"),
    (SAPIENS2, dict(layers=[{"at": "1", "attention": {"params": {"kv_heads": 2, "qk_norm": False}}}]),
     "per-block overrides of more than kv_heads"),
    (DINOV3, dict(pos_embed={"params": {"min_period": 0.5, "max_period": 90.0}}), "RoPE min_period=0.5"),
    (DINOV3, dict(mlp={"params": {"act": "quick_gelu"}}), "Eva: GELU MLP or SwiGLU"),
    (DINOV3, dict(block={"name": "respostnorm", "params": {"init_values": None}}, attention={"params": {"qk_norm": True}}),
     "res-post-norm block with layer scale, qk-norm"),
    (DINOV3, dict(pre_norm=True), "patch embedding with bias"),
    (("vit_pe_core_tiny_patch16_384", dict(depth=1, img_size=64)), dict(pool={"params": {"latent_len": 2}}),
     "map pool with latent_len=2"),
])
def test_export_refuses_what_eva_cannot_hold(base, changes, refusal):
    """A spec timm's ``Eva`` cannot express is refused by ``timm_kwargs`` with the feature named (the
    spec itself is valid: vitlab builds it)."""
    data = with_changes(spec_from_timm(base[0], **base[1]).to_dict(), **changes)
    vitlab.load_spec(data)
    with pytest.raises(SpecError, match=refusal):
        timm_kwargs(data)
