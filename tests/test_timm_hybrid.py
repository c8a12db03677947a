"""timm's hybrid ViTs (``vision_transformer_hybrid``, issue 12): a CNN backbone from vitlab's fixed
table wrapped by the ``hybrid`` patch embedder.

References are timm's: its models built on the meta device (reading), its outputs after loading its
(randomized) weights, fvcore on its own unfused model (FLOPs), the sizes its model functions in
``timm/models/vision_transformer_hybrid.py`` give (expected specs). Every timm model is built with
``pretrained=False``. Coverage, outputs, FLOPs, derived counts and the round trip of the family are checked with every
other family's in ``test_zoo_coverage.py`` and ``test_timm_parity.py``; here, what is its own.
"""
from __future__ import annotations

import functools

import pytest
import torch

timm = pytest.importorskip("timm")

import vitlab  # noqa: E402
from vitlab import SpecError  # noqa: E402
from vitlab.timm_interop import spec_from_timm, timm_kwargs, zoo  # noqa: E402
from timm_reference import assert_flops_match_fvcore, assert_outputs_match_timm, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

FAMILY = "vision_transformer_hybrid"
SMALL = dict(depth=1, embed_dim=64, num_heads=2, img_size=32)  # ResNet-50 sized CNNs: a 2x2 or 1x1 grid


# --- reading, on the meta device ------------------------------------------------------------------

# name -> (backbone row, pixels per token, projection), as timm's model functions build them
EXPECTED = {
    "vit_tiny_r_s16_p8_224": ({"name": "resnetv2_stem"}, 32, True),  # stem stride 4, patch_size=8
    "vit_small_r26_s32_224": ({"name": "resnetv2", "layers": [2, 2, 2, 2]}, 32, True),
    "vit_base_r50_s16_384": ({"name": "resnetv2", "layers": [3, 4, 9]}, 16, True),
    "vit_large_r50_s32_224": ({"name": "resnetv2", "layers": [3, 4, 6, 3]}, 32, True),
    "vit_small_resnet50d_s16_224": ({"name": "resnet50d", "out_index": 3}, 16, True),
    "vit_base_resnet26d_224": ({"name": "resnet26d", "out_index": 4}, 32, True),
    "vit_base_mci_224": ({"name": "mci_stem"}, 16, False),  # proj=False: the stem's 768 channels are tokens
}


def test_family_reads_every_model():
    """What ``zoo.coverage`` counts (each model built on meta and read; here any error fails), plus,
    against timm's own model: the token grid of every model, and the backbone row, pixels per token
    and projection of those in ``EXPECTED``."""
    names = timm.list_models(module=FAMILY)
    assert len(names) == 14 and set(EXPECTED) <= set(names)
    for name in names:
        tm = zoo.meta_model(name)
        spec = spec_from_timm(tm)
        assert spec.patch_embed.name == "hybrid", name
        assert spec.build_context().grid_size == tuple(tm.patch_embed.grid_size), name
        assert (spec.embed_dim, spec.depth) == (tm.embed_dim, len(tm.blocks)), name
        if name in EXPECTED:
            backbone, patch, proj = EXPECTED[name]
            params = spec.patch_embed.params
            assert params["backbone"] == {**params["backbone"], **backbone}, name
            assert (spec.patch_size, params["proj"]) == (patch, proj), name


def test_backbone_outside_the_table_is_refused():
    """A HybridEmbed around a CNN the table does not build (ResNet-18 features) is refused by name,
    although its type is one the table's ResNet-D rows produce: the whole network is compared."""
    from timm.layers import HybridEmbed
    from timm.models.resnet import resnet18
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        backbone = resnet18(features_only=True, out_indices=[4])
        tm = VisionTransformer(img_size=64, patch_size=1, embed_dim=64, depth=1, num_heads=2,
                               embed_layer=functools.partial(HybridEmbed, backbone=backbone))
    with pytest.raises(SpecError, match="hybrid CNN backbone FeatureListNet built unlike any of vitlab's"):
        spec_from_timm(tm)


# --- a recipe names a table row, never code ----------------------------------------------------------

def _hybrid_recipe(**params):
    return {"name": "h", "img_size": 64, "patch_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2,
            "patch_embed": {"name": "hybrid", "params": params}}


@pytest.mark.parametrize("backbone, message", [
    ({"name": "resnet101"}, "unknown backbone 'resnet101'"),
    ({"name": "timm.models.resnet.resnet101"}, "unknown backbone 'timm.models.resnet.resnet101'"),
    ("resnet50d", "give the backbone as a mapping"),
])
def test_unknown_backbone_is_refused_listing_the_table(backbone, message, monkeypatch):
    """Refused at validation with every valid name, before anything of timm is looked up (the
    hook that imports timm fails the test if reached)."""
    from vitlab.components import hybrid

    def no_code(*args):
        raise AssertionError(f"timm was reached: {args}")

    monkeypatch.setattr(hybrid, "_timm_attr", no_code)
    with pytest.raises(SpecError) as info:
        vitlab.load_spec(_hybrid_recipe(backbone=backbone))
    text = str(info.value)
    assert message in text and "patch_embed.params.backbone" in text
    assert all(name in text for name in ("resnetv2_stem", "resnetv2", "resnet26d", "resnet50d", "mci_stem"))


@pytest.mark.parametrize("params, message", [
    ({"backbone": {"name": "resnetv2", "layers": [3, 4, 9], "conv_layer": "os.system"}}, "conv_layer: extra inputs"),
    ({"backbone": {"name": "resnetv2", "layers": [3, 4, 9, 3, 2]}}, "at most 4 items"),
    ({"backbone": {"name": "resnetv2", "layers": [0]}}, "greater than 0"),
    ({"backbone": {"name": "resnet26d", "out_index": 5}}, "less than or equal to 4"),
    ({"backbone": {"name": "resnet26d", "out_index": 3}, "proj": False}, "patch_size must be the backbone's stride 16"),
])
def test_backbone_numbers_are_validated(params, message):
    with pytest.raises(SpecError, match=message):
        vitlab.load_spec(_hybrid_recipe(**params))


def test_stride_must_divide_the_patch():
    """resnetv2 with 3 stages downsamples by 16 (timm's R50 s16): a 24 px patch cannot hold it."""
    data = _hybrid_recipe(backbone={"name": "resnetv2", "layers": [1, 1, 1]})
    with pytest.raises(SpecError, match="downsamples by 16, which does not divide patch_size 24x24"):
        vitlab.load_spec({**data, "img_size": 48, "patch_size": 24})
    assert vitlab.load_spec({**data, "patch_size": 16}).build_context().grid_size == (4, 4)


# --- timm's weights, loaded -------------------------------------------------------------------------

def test_dynamic_img_size_matches_timm():
    """timm's dynamic_img_size hybrid (NHWC tokens) at another image size."""
    tm = randomize(timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, depth=1, img_size=64,
                                     dynamic_img_size=True)).eval()
    other = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(2))
    model, _ = assert_outputs_match_timm(tm, weights=tm, inputs=lambda spec: other)
    assert model.spec.dynamic_img_size


# --- FLOPs equal fvcore's on timm's own model (unfused attention) ------------------------------------

def test_std_conv_same_counted_on_meta():
    """timm's StdConv2dSame has its own forward (SAME padding, standardised weights): the meta
    stand-in catches its F.conv2d, so the count stays on meta and equals fvcore's on timm's model."""
    _, full, _ = assert_flops_match_fvcore("vit_tiny_r_s16_p8_224", rtol=0, depth=1, img_size=64)
    assert full.device == "meta"


# --- back to timm: what it cannot hold ----------------------------------------------------------------

def test_export_builds_a_backbone_per_model():
    """timm_kwargs' embed_layer builds a new backbone from the table row each time it is called."""
    kw = timm_kwargs(spec_from_timm("vit_tiny_r_s16_p8_224", depth=1, img_size=64))
    a, b = timm.models.vision_transformer.VisionTransformer(**kw), timm.models.vision_transformer.VisionTransformer(**kw)
    assert a.patch_embed.backbone is not b.patch_embed.backbone


def test_export_refuses_bias_timm_cannot_hold():
    spec = spec_from_timm("vit_tiny_r_s16_p8_224", depth=1, img_size=64)
    data = spec.to_dict()
    data["patch_embed"]["params"]["bias"] = False
    with pytest.raises(SpecError, match="projection bias exactly when pre_norm is off"):
        timm_kwargs(data)
