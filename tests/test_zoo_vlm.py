"""timm's VLM vision towers (issue 12): ``qwen3_vit`` (Qwen3-VL / Qwen3.5), ``gemma4_vit`` (Gemma 4)
and ``deepseek_vit`` (DeepSeek-V4), encoders and classifiers.

Every model of the three families is read on the meta device; per family, reduced models give
outputs equal to timm's after loading timm's (randomized) weights, FLOPs equal to fvcore's on
timm's own unfused model, derived counts equal to full ones, and a round trip through timm's
classifier class gives identical outputs and the same spec back. The references are timm's own
outputs and fvcore on timm's model (``timm_reference``), never vitlab's.
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
from timm_reference import assert_round_trip, images, outputs, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

FAMILIES = ("qwen3_vit", "gemma4_vit", "deepseek_vit")
SMALL = dict(depth=2, embed_dim=64, num_heads=2)
# Gemma 4 keeps no image size (it takes any): the spec's is the pretrained config's input size
GEMMA = dict(SMALL, head_dim=32, intermediate_size=128, position_embedding_size=16,
             pretrained_cfg_overlay=dict(input_size=(3, 96, 96)))


def perturb_buffers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the saved buffers ``randomize`` leaves alone values that act: Gemma 4's clamps (±inf
    as built) to ±1.5, its post-pool standardisation to a random shift and scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith(("input_min", "output_min", "input_max", "output_max")):
                b.fill_(-1.5 if name.endswith("_min") else 1.5)
            elif name.endswith("std_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("std_scale"):
                b.copy_(1 + torch.randn(b.shape, generator=g) * 0.1)
    return model


def vlm_images(spec, batch: int = 2) -> torch.Tensor:
    """``images`` in [0, 1] for Gemma 4 (which maps pixels from [0, 1] itself), as they are."""
    x = images(spec, batch)
    return x.sigmoid() if spec.patch_embed.name == "linear_pixnorm" else x


# --- reading, on the meta device ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_every_model_of_the_family_reads(family):
    assert_family_reads(family)


def test_towers_read_into_their_components():
    qwen = spec_from_timm(zoo.meta_model("qwen3_vit_416m_enc"))
    assert (qwen.pos_embed.name, qwen.pos_embed.params["table_grid"]) == ("rope_table", [48, 48])
    assert qwen.pool.name == "unshuffle_mlp" and qwen.pool.params["out_features"] == 5120  # default tag: Qwen3.8-27B
    assert qwen.mlp_hidden_dim == 4304 and not qwen.final_norm and not qwen.dynamic_img_size
    gemma = spec_from_timm(zoo.meta_model("gemma4_vit_167m_enc"))
    assert (gemma.attention.name, gemma.mlp.name, gemma.block.name) == ("mhsa_qkvnorm", "glu", "sandwich")
    assert gemma.attention.params["clamp"] and gemma.pool.params == {"kernel": 3, "standardize": False}
    assert gemma.img_hw == (768, 768)  # timm's pretrained input size
    assert spec_from_timm(zoo.meta_model("gemma4_vit_570m_enc")).pool.params["standardize"]
    deepseek = spec_from_timm(zoo.meta_model("deepseek_vit_412m"))
    assert deepseek.pool.name == "avg_std" and deepseek.pool.params["norm"] == "rmsnorm" and deepseek.final_norm
    assert deepseek.mlp.name == "swiglu" and deepseek.dynamic_img_size


def test_refusals_name_the_feature():
    with pytest.raises(SpecError, match="mean over cell_avg tokens"):
        spec_from_timm("gemma4_vit_167m", depth=1, encoder_pool="soft")
    with pytest.raises(SpecError, match="classifier norm without weights on every token"):
        spec_from_timm("qwen3_vit_88m", depth=1, global_pool="")


# --- outputs equal timm's, after loading timm's weights --------------------------------------------

COMPARED = {  # name -> create_model kwargs
    "qwen3_vit_88m": dict(SMALL, img_size=64, pos_embed_grid_size=6, num_classes=5),  # table resampled 6 -> 4
    "qwen3_vit_306m_merge": dict(SMALL, img_size=(64, 96), pos_embed_grid_size=4, out_features=48, num_classes=5),
    "qwen3_vit_416m_enc": dict(SMALL, img_size=64, pos_embed_grid_size=4, out_features=40),  # the merger's tokens
    "gemma4_vit_167m": dict(GEMMA, num_classes=5),  # clamped projections
    "gemma4_vit_570m_enc": dict(GEMMA, pretrained_cfg_overlay=dict(input_size=(3, 96, 144))),  # standardised cells
    "deepseek_vit_412m": dict(SMALL, img_size=56, num_classes=5),
    "deepseek_vit_412m_align": dict(SMALL, img_size=56, out_features=32, num_classes=5),  # 4x4 grid padded to 6x6
    "deepseek_vit_412m_enc": dict(SMALL, img_size=(70, 42), out_features=32),
}


@pytest.mark.parametrize("name", COMPARED)
def test_outputs_match_timm(name):
    tm = perturb_buffers(randomize(timm.create_model(name, pretrained=False, **COMPARED[name]))).eval()
    assert_outputs_match_timm(tm, inputs=vlm_images)


@pytest.mark.parametrize("name, kw, size", [
    ("qwen3_vit_88m", dict(SMALL, img_size=64, pos_embed_grid_size=6, num_classes=5), (96, 128)),
    ("deepseek_vit_412m", dict(SMALL, img_size=56, num_classes=5), (112, 84)),
])
def test_classifiers_follow_other_image_sizes(name, kw, size):
    """Without a grid-bound projector the towers take any size, as timm's: RoPE recomputed and
    Qwen's table resampled for the new grid."""
    tm = randomize(timm.create_model(name, pretrained=False, **kw)).eval()
    other = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    model, _ = assert_outputs_match_timm(tm, weights=tm, inputs=lambda spec: other)
    assert model.spec.dynamic_img_size


def test_grid_bound_pools_refuse_other_sizes():
    spec = spec_from_timm("qwen3_vit_88m_enc", depth=1, img_size=64, out_features=16)
    with pytest.raises(SpecError, match="needs dynamic_img_size false"):
        vitlab.load_spec({**spec.to_dict(), "dynamic_img_size": True})
    with pytest.raises(SpecError, match="divisible by kernel 3"):
        spec_from_timm("gemma4_vit_167m_enc", depth=1, pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))


def test_gemma_classifier_standardisation_it_never_uses_is_left_out():
    """timm builds gemma4_vit_570m's std_bias / std_scale whatever the pool, and uses them only after
    soft tokens; its classifier's spec has no place for them: the load names them, the rest fits."""
    tm = randomize(timm.create_model("gemma4_vit_570m", pretrained=False, **dict(GEMMA, num_classes=5))).eval()
    spec = spec_from_timm(tm)
    model = build_model(spec)
    report = load_timm_weights(model, tm, strict=False)
    assert report.unexpected == ["pool.std_bias", "pool.std_scale"] and not report.missing, str(report)
    x = vlm_images(spec)
    assert_close(outputs(model, x), outputs(tm, x))


# --- FLOPs equal fvcore's on timm's own model (unfused attention) ------------------------------------

FLOPS = {  # full width where fvcore's RMSNorm blind spot (below) is small against the matmuls
    "qwen3_vit_88m": dict(SMALL, img_size=64, pos_embed_grid_size=6, num_classes=5),
    "qwen3_vit_306m_merge": dict(depth=1, img_size=64, out_features=64, num_classes=5),
    "gemma4_vit_167m": dict(depth=1, position_embedding_size=16, num_classes=5,
                            pretrained_cfg_overlay=dict(input_size=(3, 96, 96))),
    "gemma4_vit_570m_enc": dict(depth=1, position_embedding_size=16,
                                pretrained_cfg_overlay=dict(input_size=(3, 96, 96))),
    "deepseek_vit_412m": dict(depth=1, img_size=56, num_classes=5),
    "deepseek_vit_412m_align": dict(depth=1, img_size=56, out_features=64, num_classes=5),
}


@pytest.mark.parametrize("name", FLOPS)
def test_flops_equal_fvcore_on_timm_and_derived_equals_full(name):
    spec, full, theirs = assert_flops_match_fvcore(name, **FLOPS[name])
    # the whole difference: fvcore counts nothing for timm's hand-written RMSNorm (pow, mean, rsqrt),
    # vitlab 4 per element for aten::rms_norm; what remains is Gemma's RoPE angles, a matmul in timm
    rms = full.by_operator.get("aten::rms_norm", 0)
    assert abs(full.flops - rms - theirs) <= 1e-4 * theirs, (full.flops, rms, theirs)
    assert_derived_equals_full(spec)  # every key, the RoPE tables built in the embedding included


# --- back to timm ----------------------------------------------------------------------------------

ROUND_TRIP = {  # every spec goes back as the family's classifier class, which holds encoders too
    "qwen3_vit_88m_merge": dict(SMALL, img_size=64, pos_embed_grid_size=4, out_features=48, num_classes=5),
    "qwen3_vit_306m_enc": dict(SMALL, img_size=(64, 96), pos_embed_grid_size=5, out_features=0),  # no fc2
    "gemma4_vit_167m": dict(GEMMA, position_embedding_size=48),  # at timm's 768 px: it keeps no size
    "gemma4_vit_570m_enc": dict(GEMMA, depth=1, position_embedding_size=48),
    "deepseek_vit_412m": dict(SMALL, img_size=56, num_classes=5),
    "deepseek_vit_412m_enc": dict(SMALL, img_size=(70, 42), out_features=32, dynamic_img_pad=True),
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_through_timm(name):
    kw = {k: v for k, v in ROUND_TRIP[name].items() if k != "pretrained_cfg_overlay"}
    assert_round_trip(spec_from_timm(name, **kw), prepare=perturb_buffers, inputs=vlm_images)


def test_export_refuses_what_the_classifier_cannot_hold():
    data = spec_from_timm("qwen3_vit_88m_merge", depth=1, img_size=64, out_features=16).to_dict()
    data["pool"]["params"]["order"] = "chw"
    with pytest.raises(SpecError, match="Qwen3VitClassifier equivalent: merged channels in 'chw' order"):
        timm_kwargs(data)
    data = spec_from_timm("deepseek_vit_412m", depth=1, img_size=56).to_dict()
    data["pool"]["params"]["eps"] = 1e-5
    with pytest.raises(SpecError, match="DeepseekVitClassifier equivalent: pool norm rmsnorm with eps 1e-05"):
        timm_kwargs(data)
