"""timm's PiT (``PoolingVisionTransformer``) read into staged vitlab specs, its weights loaded, and
handed back to timm.

References come from timm itself (its models' parameter counts, state-dict names and shapes, and
outputs, every model built with ``pretrained=False``) and from fvcore's ``FlopCountAnalysis`` on
timm's own model with unfused attention. Weights are perturbed first, so unit norms and zero
biases cannot hide a wrong mapping.
"""
from __future__ import annotations

import pytest

timm = pytest.importorskip("timm")

from timm.models.pit import PoolingVisionTransformer  # noqa: E402

import vitlab  # noqa: E402
from vitlab import SpecError, WeightsError, build_model, load_spec  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_kwargs, to_timm_state_dict  # noqa: E402
from timm_reference import assert_close, assert_flops_match_fvcore, assert_outputs_match_timm  # noqa: E402
from timm_reference import assert_round_trip, fvcore_flops, images, outputs, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

PIT = ["pit_b_224", "pit_b_distilled_224", "pit_s_224", "pit_s_distilled_224", "pit_ti_224",
       "pit_ti_distilled_224", "pit_xs_224", "pit_xs_distilled_224"]
COMPARED = ["pit_ti_224", "pit_xs_224", "pit_ti_distilled_224"]  # run at 224 px


def test_every_pit_model_is_covered():
    assert sorted(timm.list_models("pit_*")) == PIT


def timm_pit(name: str, **kw) -> PoolingVisionTransformer:
    return randomize(timm.create_model(name, pretrained=False, **kw)).eval()


def with_stages(spec, stage: int, **changes):
    """``spec`` with one stage changed (the totals follow from the stages)."""
    data = {k: v for k, v in spec.to_dict().items() if k not in ("depth", "embed_dim", "num_heads")}
    data["stages"][stage].update(changes)
    return load_spec(data)


# --- all eight models, on the meta device ----------------------------------------------------

@pytest.mark.parametrize("name", PIT)
def test_spec_of_every_pit_model(name):
    """Stages, tokens and pool as timm built them; the vitlab model has timm's parameter count, and
    its weights in timm's names are exactly timm's state dict (names and shapes)."""
    tm = timm.create_model(name, pretrained=False, device="meta")
    spec = spec_from_timm(name)
    distilled = "distilled" in name
    assert spec.name == name
    assert [(st.depth, st.embed_dim, st.num_heads) for st in spec.stages] == [
        (len(t.blocks), b * h, h) for t, b, h in zip(tm.transformers, tm.base_dims, tm.heads)]
    assert spec.patch_embed.params["stride"] == tm.patch_embed.conv.stride[0]
    assert (spec.reg_tokens, spec.pool.name) == ((1, "distilled") if distilled else (0, "token"))
    model = build_model(spec, device="meta")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tm.parameters())
    ours = {k: tuple(v.shape) for k, v in to_timm_state_dict(model).items()}
    assert ours == {k: tuple(v.shape) for k, v in tm.state_dict().items()}


# --- outputs, FLOPs and the round trip at 224 px -----------------------------------------------

@pytest.mark.parametrize("name", COMPARED)
def test_outputs_match_timm(name):
    _, report = assert_outputs_match_timm(timm_pit(name))
    converted = ["cls_token", "pos_embed.weight", "reg_token"] if "distilled" in name else ["pos_embed.weight"]
    assert sorted(report.converted) == converted and not report.resampled


def test_weights_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    tm = timm_pit("pit_xs_distilled_224", img_size=96)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(tmp_path / "pit.safetensors"))
    assert_outputs_match_timm(tm, weights=tmp_path / "pit.safetensors")


@pytest.mark.parametrize("name", COMPARED)
def test_flops_equal_fvcore_on_timm(name):
    spec, full, _ = assert_flops_match_fvcore(name, rtol=0)  # equal, at 224 px
    assert vitlab.analyze(spec, method="derived").flops == full.flops


@pytest.mark.parametrize("name", ["pit_ti_224", "pit_ti_distilled_224"])
def test_round_trip_through_timm(name):
    assert_round_trip(spec_from_timm(name), timm_cls=PoolingVisionTransformer)


def test_non_square_images_and_cropping_stride():
    """A 100 x 83 image: the stride-8 patch grid crops (11 x 9), odd grids pool to 6 x 5 and 3 x 3."""
    tm = timm_pit("pit_ti_224", img_size=(100, 83), num_classes=7)
    model, _ = assert_outputs_match_timm(tm, weights=tm)
    assert model.spec.img_size == (100, 83)
    assert model.stage_grids == [(11, 9), (6, 5), (3, 3)]


# --- the bundled recipe --------------------------------------------------------------------------

def test_pit_ti_like_recipe_takes_pit_ti_weights():
    """The bundled recipe is PiT-Ti: timm's weights load, outputs match, and its FLOPs equal
    fvcore's on timm's model (the last norm acts on the class token only, in the pool)."""
    tm = timm_pit("pit_ti_224")
    spec = load_spec("pit_ti_like")
    model = build_model(spec)
    report = load_timm_weights(model, tm)
    assert report.ok and "pool.norm.weight" in report.loaded
    x = images(spec)
    assert_close(outputs(model, x), outputs(tm, x))
    assert timm_kwargs(spec) == timm_kwargs(spec_from_timm("pit_ti_224"))
    assert vitlab.analyze(spec).flops == fvcore_flops("pit_ti_224")


def test_checkpoint_with_other_stage_depths_is_refused():
    """Blocks are matched within their stage: a block beyond a stage's depth is never moved into
    the next stage."""
    tm = timm_pit("pit_ti_224", img_size=64)
    spec = with_stages(with_stages(spec_from_timm(tm), 1, depth=5), 2, depth=5)
    with pytest.raises(WeightsError) as info:
        load_timm_weights(build_model(spec), tm)
    text = str(info.value)
    assert "unexpected: transformers.1.blocks.5.norm1.weight" in text and "missing: blocks.11.norm1.weight" in text
    assert "shape mismatch:" not in text


# --- what has no equivalent ----------------------------------------------------------------------

@pytest.mark.parametrize("kw, feature", [
    (dict(pos_drop_rate=0.1), "position dropout"),
    (dict(global_pool=""), "global_pool ''"),
])
def test_unsupported_pit_feature_is_named(kw, feature):
    tm = timm.create_model("pit_ti_224", pretrained=False, device="meta", **kw)
    with pytest.raises(SpecError, match="unsupported") as info:
        spec_from_timm(tm)
    assert feature in str(info.value)


def test_distilled_training_mode_is_refused():
    tm = timm.create_model("pit_ti_distilled_224", pretrained=False, device="meta")
    tm.set_distilled_training(True)
    with pytest.raises(SpecError, match="distilled training mode"):
        spec_from_timm(tm)


def test_timm_kwargs_refuses_other_pooling_strides():
    spec = with_stages(spec_from_timm("pit_ti_224"), 1, transition={"name": "pit_pool", "params": {"stride": 3}})
    with pytest.raises(SpecError, match="stage 1 transition 'pit_pool'.*PiT pools with pit_pool, stride 2"):
        timm_kwargs(spec)


@pytest.mark.parametrize("overrides, why", [
    ({"norm.params.eps": 1e-5}, "norm 'layernorm' with eps=1e-05"),
    ({"attention.params.kv_heads": 1}, "attention 'mhsa' with kv_heads=1"),
    ({"reg_tokens": 2}, "reg_tokens=2"),
    ({"final_norm": True}, "set either the pool's norm or final_norm"),
    ({"layers": [{"at": 3, "mlp_ratio": 2.0}]}, "per-block overrides (block 3; timm configures every block alike)"),
])
def test_timm_kwargs_names_what_pit_cannot_express(overrides, why):
    spec = load_spec(spec_from_timm("pit_ti_224"), overrides)
    with pytest.raises(SpecError, match="no timm PoolingVisionTransformer equivalent") as info:
        timm_kwargs(spec)
    assert why in str(info.value)


def test_distilled_pool_needs_a_distillation_token():
    spec = spec_from_timm("pit_ti_distilled_224")
    with pytest.raises(SpecError, match="needs a distillation token after the class token"):
        load_spec(spec, {"reg_tokens": 0})


@pytest.mark.parametrize("overrides, why", [
    ({"attention.params.kv_heads": 1}, "grouped-query attention (kv_heads=1"),
    ({"layers": [{"at": 1, "attention": {"params": {"qk_norm": True}}}]}, "per-block overrides (block 1"),
])
def test_timm_kwargs_of_a_plain_vit_refuses_the_same(overrides, why):
    """The checks PiT's export shares with the plain ViT export."""
    spec = load_spec("vit_tiny_patch16_224", {"depth": 2, **overrides})
    with pytest.raises(SpecError, match="no timm VisionTransformer equivalent") as info:
        timm_kwargs(spec)
    assert why in str(info.value)
