"""Back to timm for the families vitlab reads beyond ``VisionTransformer`` (issue 12): a spec with
RoPE is timm's ``Eva``, one with a relative position table per block and the class token a
``Beit``, one with a relative position bias MLP (or a table without the class token) a
``VisionTransformerRelPos``.

Each round trip builds timm's own class from ``timm_kwargs``, loads ``to_timm_state_dict`` of a
vitlab model with perturbed weights (strict), and compares outputs with timm's (the reference) and
the spec timm's model reads back as. Every timm model is built with ``pretrained=False``; the
coverage test builds on the meta device.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vitlab  # noqa: E402
from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import (  # noqa: E402
    load_timm_weights,
    spec_from_timm,
    timm_class,
    timm_kwargs,
    to_timm_state_dict,
)
from vitlab.timm_interop.beit import BEIT_EXPORT  # noqa: E402
from vitlab.timm_interop import zoo  # noqa: E402
from vitlab.timm_interop.families import EVA, EVA_KEY_BIAS, export_state_dict  # noqa: E402
from vitlab.timm_interop.eva import EVA_EXPORT  # noqa: E402
from vitlab.timm_interop.relpos import RELPOS_EXPORT  # noqa: E402
from timm_reference import assert_round_trip, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

SMALL = dict(depth=2, embed_dim=64, num_heads=2)
EXPORTS = {"Eva": EVA_EXPORT, "Beit": BEIT_EXPORT, "VisionTransformerRelPos": RELPOS_EXPORT}

ROUND_TRIPS = [  # (timm model, create_model kwargs, the timm class the spec goes back to)
    ("eva02_tiny_patch14_224", dict(depth=2, img_size=70), "Eva"),  # axial RoPE, SwiGLU with norm
    ("eva02_base_patch16_clip_224", dict(SMALL, img_size=64), "Eva"),  # sub-LN, separate q / k / v in timm
    ("vit_small_patch16_dinov3", dict(depth=2, img_size=64), "Eva"),  # DINOv3 RoPE, registers, no qkv bias
    ("vit_pe_core_tiny_patch16_384", dict(depth=2, img_size=64), "Eva"),  # attention pool over every token
    ("vit_base_patch16_rope_ape_224", dict(SMALL, img_size=64), "Eva"),  # RoPE plus a learned table
    ("vit_small_patch16_rope_mixed_224", dict(SMALL, img_size=64), "Eva"),  # RoPE-Mixed's learned frequencies
    # Sapiens2: grouped-query middle blocks (per-block num_kv_heads, q / k / v apart and of unequal
    # sizes, a real key bias), attention-only layer scale, RMSNorm, registers
    ("vit_base_patch16_sapiens2", dict(depth=3, embed_dim=64, num_heads=4, num_kv_heads=(4, 2, 4), img_size=(64, 48)),
     "Eva"),
    ("vit_large_patch16_sapiens2", dict(depth=4, embed_dim=96, num_heads=4, num_kv_heads=(4, 1, 2, 4), img_size=64),
     "Eva"),
    ("vit_giant_patch16_sapiens2", dict(depth=3, embed_dim=48, num_heads=4, num_kv_heads=(2, 4, 4), img_size=32),
     "Eva"),  # grouped-query in block 0: the spec's own kv_heads, full heads in its layers
    # grouped-query in every block and no qkv bias: AttentionRope without biases
    ("vit_small_patch16_dinov3", dict(depth=2, img_size=64, attn_type="rope", qkv_fused=False, num_kv_heads=2), "Eva"),
    ("beit_base_patch16_224", dict(SMALL, img_size=64), "Beit"),  # avg pool, fc_norm
    ("beitv2_large_patch16_224", dict(SMALL, img_size=(64, 48)), "Beit"),  # a non-square grid
    ("beit_large_patch16_512", dict(SMALL, img_size=64, global_pool="token"), "Beit"),  # final norm
    ("test_vit_relpos", {}, "VisionTransformerRelPos"),  # a bias MLP per block, fc_norm
    ("vit_srelpos_small_patch16_224", dict(SMALL, img_size=64, rel_pos_dim=32), "VisionTransformerRelPos"),
    ("vit_relpos_medium_patch16_cls_224", dict(SMALL, img_size=(64, 48)), "VisionTransformerRelPos"),
    ("vit_relpos_base_patch16_rpn_224", dict(SMALL, img_size=64), "VisionTransformerRelPos"),  # res-post-norm
    ("vit_relpos_small_patch16_224", dict(SMALL, img_size=64, rel_pos_type="bias"), "VisionTransformerRelPos"),
    # a relpos table with the class token is Beit's: timm's key bias dropped, which softmax ignores
    ("vit_relpos_small_patch16_224", dict(SMALL, img_size=64, rel_pos_type="bias", class_token=True,
                                          global_pool="token"), "Beit"),
]


@pytest.mark.parametrize("name, kw, cls", ROUND_TRIPS)
def test_round_trip_through_timm(name, kw, cls):
    """timm's class, built from ``timm_kwargs`` with the exported weights, gives the vitlab model's
    outputs (every weight perturbed, the key bias too) and reads back as the same spec."""
    spec = spec_from_timm(name, **kw)
    assert [c for c, ex in EXPORTS.items() if ex.claims(spec)] == [cls]  # claims are disjoint
    assert_round_trip(spec, timm_cls=cls)


@pytest.mark.parametrize("name, kw, family", [
    ("eva02_base_patch16_clip_224", dict(SMALL, img_size=64), EVA),  # q / k / v apart, EVA's q / v biases
    ("vit_small_patch16_dinov3_qkvb", dict(depth=2, img_size=64), EVA),  # fused qkv, q_bias / v_bias
    # AttentionRope's q / k / v apart with a key bias, k / v smaller than q in the grouped-query block
    # (its SwiGLU's fc1 split, as the export builds it: the packed one is the weight loader's)
    ("vit_base_patch16_sapiens2", dict(depth=2, embed_dim=64, num_heads=4, num_kv_heads=(4, 1), img_size=32,
                                       swiglu_align_to=1), EVA_KEY_BIAS),
])
def test_eva_table_read_backwards_gives_timms_layouts(name, kw, family):
    """``families.EVA`` (``EVA_KEY_BIAS``) read backwards into a timm model's keys gives back that
    model's own state dict, in each of Eva's layouts, a fused qkv split in the sizes of the target's
    q / k / v (the reference: timm's tensors, loaded and written back)."""
    tm = randomize(timm.create_model(name, pretrained=False, **kw))
    model = build_model(spec_from_timm(tm))
    assert load_timm_weights(model, tm).ok
    theirs = tm.state_dict()
    ours = export_state_dict(model, family, theirs)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


EVA_MODELS = timm.list_models(module="eva")


@pytest.mark.parametrize("name", EVA_MODELS)
def test_every_eva_model_exports(name):
    """Every model of timm's ``eva`` module (65 with timm 1.0.31, the 4 Sapiens2 with grouped-query
    middle blocks among them), built on meta: ``timm_kwargs`` builds a timm model (an ``Eva``, or a
    ``VisionTransformer`` for EVA-01's models without RoPE) that reads back as the same spec, and
    ``to_timm_state_dict`` fills exactly its tensors, shape for shape."""
    spec = spec_from_timm(zoo.meta_model(name))
    with torch.device("meta"):
        tm = timm_class(spec)(**timm_kwargs(spec))
    assert spec_from_timm(tm).model_dump(exclude={"name"}) == spec.model_dump(exclude={"name"})
    ours = to_timm_state_dict(build_model(spec, device="meta"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in tm.state_dict().items()}


def test_eva_export_covers_sapiens2():
    """All of the family exports (above), grouped-query Sapiens2 included: 4 of its 5 sizes have
    grouped-query middle blocks (``layers``; the 0.1B has too few blocks)."""
    assert len(EVA_MODELS) >= 65
    sapiens2 = [n for n in EVA_MODELS if n.endswith("_sapiens2")]
    assert sum(bool(spec_from_timm(zoo.meta_model(n)).layers) for n in sapiens2) == 4


def _spec(name: str, **kw) -> dict:
    return spec_from_timm(name, **kw).to_dict()


def _with(data: dict, **changes) -> dict:
    """``data`` with ``{kind: {"params": {...}}}`` merged into its selections, other keys replaced."""
    out = dict(data)
    for key, value in changes.items():
        if isinstance(value, dict) and "params" in value and key in out and "name" not in value:
            out[key] = {**out[key], "params": {**out[key].get("params", {}), **value["params"]}}
        else:
            out[key] = value
    return out


DINOV3 = ("vit_small_patch16_dinov3", dict(depth=2, img_size=64))
BEIT = ("beit_base_patch16_224", dict(SMALL, img_size=64))
RELPOS = ("test_vit_relpos", {})
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
    (BEIT, dict(attention={"params": {"qk_norm": True}}), "timm Beit equivalent: qk-norm"),
    (BEIT, dict(pos_embed={"name": "learned", "params": {"include_prefix": False}}), "position encoding 'learned'"),
    (BEIT, dict(final_norm=True), "a final norm and a norm after pooling together"),
    (BEIT, dict(block={"name": "respostnorm", "params": {"init_values": None}}), "block 'respostnorm'"),
    (RELPOS, dict(pos_embed={"name": "relpos_mlp", "params": {"hidden": 32}}),
     "shared by every block and one per block together"),
    (RELPOS, dict(dynamic_img_size=True), "VisionTransformerRelPos takes one image size"),
    (RELPOS, dict(mlp={"name": "swiglu", "params": {}}), "mlp 'swiglu'"),
    (RELPOS, dict(reg_tokens=1), "register tokens"),
])
def test_export_refuses_what_timm_cannot_hold(base, changes, refusal):
    """A spec the family's timm class cannot express is refused by ``timm_kwargs`` with the feature
    named (the spec itself is valid: vitlab builds it)."""
    data = _with(_spec(base[0], **base[1]), **changes)
    vitlab.load_spec(data)
    with pytest.raises(SpecError, match=refusal):
        timm_kwargs(data)

