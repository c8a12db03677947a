"""Every timm family vitlab reads, on the same four checks, each on at least two models per family
(reduced models where a full one would only cost time):

* outputs equal timm's (within ``RTOL`` = 1e-4 of the largest output) after loading timm's weights,
  perturbed so that no zero bias or unit scale hides a wrong mapping;
* FLOPs within 0.5 % of fvcore's on timm's own unfused model;
* derived counts equal to the full trace in every key;
* a round trip: timm's class built from ``timm_kwargs`` takes ``to_timm_state_dict`` strictly, gives
  the vitlab model's outputs and reads back as the same spec.

The references are timm's own forward and fvcore on timm's model (``timm_reference``), never
vitlab's. Family-specific checks (weights under which names, other image sizes, refusals) live in
the family's own test module. Every timm model is built with ``pretrained=False``.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

timm = pytest.importorskip("timm")

from vitlab.timm_interop import spec_from_timm  # noqa: E402
from test_timm_swin import SMALL as SWIN_SMALL
from timm_reference import (  # noqa: E402
    assert_close,
    assert_derived_equals_full,
    assert_flops_match_fvcore,
    assert_outputs_match_timm,
    assert_round_trip,
    images,
    one_layer_scale_if_parallel,
    perturb_buffers,
    randomize,
    randomize_stats,
    sized_images,
    vlm_images,
)

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")


@dataclass(frozen=True)
class Case:
    """One model of a family: ``name`` built as ``create_model(name, **kw)`` / ``spec_from_timm``."""

    family: str
    name: str
    kw: dict


def cases(family: str, *rows) -> list[Case]:
    return [Case(family, name, kw) for name, kw in rows]


def ids(table: list[Case]) -> list[str]:
    seen: Counter = Counter()
    out = []
    for c in table:
        seen[c.name] += 1
        out.append(f"{c.family}-{c.name}" + (f"-{seen[c.name]}" if seen[c.name] > 1 else ""))
    return out


SMALL = dict(depth=2, embed_dim=64, num_heads=2)
THREE_THINGS = functools.partial(timm.models.vision_transformer.ParallelThingsBlock, num_parallel=3)
SAM_PADDED = dict(embed_dim=64, num_heads=2, depth=3, img_size=128, window_size=3, global_attn_indexes=[1])
HYBRID = dict(depth=1, embed_dim=64, num_heads=2, img_size=32)  # ResNet-50 sized CNNs: a 2x2 or 1x1 grid
# Gemma 4 keeps no image size (it takes any): the spec's is the pretrained config's input size
GEMMA = dict(SMALL, head_dim=32, intermediate_size=128, position_embedding_size=16,
             pretrained_cfg_overlay=dict(input_size=(3, 96, 96)))


# --- how each family's models are perturbed and fed -------------------------------------------------

def _sized_and_other(spec):
    return images(spec), torch.randn(1, 3, 80, 112, generator=torch.Generator().manual_seed(2))


def _naflex_embedding_matches(model, tm, spec):
    """The tokens entering the first block: a wrong position table shows here far above the
    tolerance, while in the logits it may drown under the blocks."""
    for x in sized_images(spec):
        with torch.no_grad():
            ours, theirs = model.embed(x)[0], tm.norm_pre(tm.embeds(x)[0])
        assert_close(ours, theirs, rtol=1e-6)


def _backbone_loaded_as_is(report, tm):
    backbone = [k for k in tm.state_dict() if k.startswith("patch_embed.backbone.")]
    assert backbone and set(backbone) <= set(report.loaded)  # timm's names, loaded as they are


def _class_token_is_the_transitions(report):
    assert "transitions.1.cls_token" in report.loaded


@dataclass(frozen=True)
class Feed:
    perturb: Callable = randomize  # timm's model (outputs) or vitlab's (round trip), in place
    inputs: Callable | None = None  # spec -> images (default: ``images(spec)``)
    check: Callable | None = None  # (model, report, tm, spec) -> None, after outputs matched


FEEDS = {
    "vision_transformer_hybrid": Feed(lambda m: randomize_stats(randomize(m)),
                                      check=lambda model, report, tm, spec: _backbone_loaded_as_is(report, tm)),
    "xcit": Feed(lambda m: randomize_stats(randomize(m), mean=0.2), inputs=_sized_and_other),
    "naflexvit": Feed(inputs=sized_images, check=lambda model, report, tm, spec: _naflex_embedding_matches(
        model, tm, spec)),
    "convit": Feed(check=lambda model, report, tm, spec: _class_token_is_the_transitions(report)),
    **dict.fromkeys(("qwen3_vit", "gemma4_vit", "deepseek_vit"),
                    Feed(lambda m: perturb_buffers(randomize(m)), inputs=vlm_images)),
}
PLAIN = Feed()


# --- outputs equal timm's, after loading timm's weights --------------------------------------------

OUTPUTS = [
    *cases("deit", ("deit_tiny_distilled_patch16_224", {}), ("deit_small_distilled_patch16_224", dict(depth=2, img_size=96))),
    *cases("vision_transformer",
           ("beit3_base_patch16_224", dict(SMALL, img_size=64)),
           ("vit_large_patch14_reg4_dinov2", dict(SMALL, img_size=56)),
           ("vit_small_patch16_18x2_224", dict(SMALL, img_size=64)),
           ("vit_base_patch16_18x2_224", dict(SMALL, img_size=64, qkv_bias=False, block_fn=THREE_THINGS)),
           ("vit_dwee_patch16_reg1_gap_256", dict(depth=3, img_size=64)),  # λ_init differs per block
           ("vit_dlittle_patch16_reg1_gap_256", dict(depth=2, img_size=64, qk_norm=True, scale_attn_norm=True)),
           ("vit_dpwee_patch16_reg1_gap_256", dict(depth=2, img_size=64)),  # fused out_proj of both branches
           ("vit_dpwee_patch16_reg1_gap_256", dict(depth=2, img_size=64, qkv_bias=False, qk_norm=True)),
           ("vit_base_patch16_18x2_224", dict(SMALL, img_size=64, attn_layer="diff"))),  # both at once
    *cases("eva",
           ("eva02_tiny_patch14_224", {}),
           ("eva02_base_patch16_clip_224", dict(SMALL, img_size=64)),  # sub-LN, separate q/k/v, SwiGLU with norm
           ("eva02_enormous_patch14_clip_224", dict(SMALL, img_size=56)),  # res-post-norm blocks
           ("vit_small_patch16_dinov3", dict(depth=2, img_size=96)),  # DINOv3 RoPE, registers, layer scale
           ("vit_small_plus_patch16_dinov3_qkvb", dict(depth=2, img_size=64)),  # EVA's fused q/v bias, SwiGLU
           ("vit_pe_core_tiny_patch16_384", dict(depth=2, img_size=64)),  # attention pool over every token
           ("vit_base_patch16_rope_ape_224", dict(SMALL, img_size=64)),  # RoPE plus a learned table
           ("vit_pe_spatial_tiny_patch16_512", dict(depth=2, img_size=64)),  # pre-norm, bias-free patch conv
           ("vit_small_patch16_rope_mixed_224", dict(SMALL, img_size=64)),
           ("vit_base_patch16_rope_mixed_ape_224", dict(depth=3, embed_dim=64, num_heads=4, img_size=(64, 48))),
           # Sapiens2: per-block kv heads (q / k / v parts differ in size), attention-only layer scale
           ("vit_base_patch16_sapiens2", dict(depth=3, embed_dim=64, num_heads=4, num_kv_heads=(4, 2, 4),
                                              img_size=(64, 48))),
           ("vit_large_patch16_sapiens2", dict(depth=4, embed_dim=96, num_heads=4, num_kv_heads=(4, 1, 2, 4),
                                               img_size=64))),
    *cases("beit",
           ("beit_base_patch16_224", dict(SMALL, img_size=64)),  # per-block relative position table, q / v bias
           ("beitv2_large_patch16_224", dict(SMALL, img_size=(64, 48))),  # the table on a non-square grid
           ("beit_large_patch16_512", dict(SMALL, img_size=64, global_pool="token"))),  # final norm, class token
    *cases("vision_transformer_relpos",
           ("test_vit_relpos", {}),  # per-block bias MLP over log-spaced offsets, fc_norm
           ("vit_relpos_medium_patch16_cls_224", dict(SMALL, img_size=(64, 48))),  # class token: zero bias rows
           ("vit_srelpos_small_patch16_224", dict(SMALL, img_size=64, rel_pos_dim=32)),  # one bias MLP for all
           ("vit_relpos_base_patch16_rpn_224", dict(SMALL, img_size=64))),  # res-post-norm blocks
    *cases("cait",
           ("cait_xxs24_224", {}),
           ("cait_s24_224", dict(depth=2, img_size=64)),
           # one class-attention block with its own MLP width, average pooling, another grid
           ("cait_xs24_384", dict(depth=1, img_size=(64, 48), depth_token_only=1, mlp_ratio_token_only=2.0,
                                  global_pool="avg")),
           ("cait_m36_384", dict(depth=1, img_size=64, global_pool="", num_classes=0))),  # every token, no head
    *cases("convit",  # timm's embed_dim is per head: convit_tiny is 4 x 48
           ("convit_tiny", dict(depth=3, local_up_to_layer=2, img_size=64)),
           ("convit_small", dict(depth=2, local_up_to_layer=1, img_size=64, embed_dim=16, global_pool="avg")),
           ("convit_base", dict(depth=2, local_up_to_layer=1, img_size=48, embed_dim=8, qkv_bias=True, num_classes=0,
                                locality_strength=0.5))),
    *cases("vision_transformer_sam",
           ("samvit_base_patch16", dict(SAM_PADDED, neck_chans=32)),  # conv neck, learned position table
           # no position table, the neck is one LayerNorm, a classifier
           ("samvit_base_patch16_224", dict(embed_dim=64, num_heads=2, depth=2, img_size=64, window_size=2,
                                            global_attn_indexes=[0])),
           ("samvit_large_patch16", dict(SAM_PADDED, num_classes=10, qk_norm=True, init_values=0.1))),
    *cases("vision_transformer_hybrid",
           ("vit_tiny_r_s16_p8_224", dict(depth=2, img_size=64)),  # ResNetV2 stem, 8x8 projection
           ("vit_small_resnet50d_s16_224", HYBRID),  # ResNet-50-D to stage 3 (features_only), BatchNorm
           ("vit_small_r26_s32_224", HYBRID),  # ResNetV2 (2, 2, 2, 2): StdConv2dSame, GroupNorm
           ("vit_base_mci_224", dict(depth=1, img_size=64))),  # MobileCLIP stem, no projection, no_embed_class
    *cases("xcit",
           ("xcit_nano_12_p16_224", dict(depth=2)),  # class-token norm only (tokens_norm=False)
           ("xcit_tiny_12_p8_224", dict(depth=2, img_size=64)),  # 8 px patches, tokens_norm=True
           ("xcit_small_24_p16_384", dict(depth=1, embed_dim=64, img_size=(64, 48), global_pool="avg"))),
    *cases("naflexvit",  # a small table grid so every image size resamples it
           ("naflexvit_base_patch16_gap", dict(SMALL, pos_embed_grid_size=(6, 5))),  # bicubic, antialiased
           ("naflexvit_base_patch16_parfac_gap", dict(SMALL, pos_embed_grid_size=(6, 5))),  # factorized
           ("naflexvit_base_patch16_siglip", dict(SMALL)),  # bilinear, attention pool, gelu_tanh
           ("naflexvit_base_patch16_radio_v3", dict(SMALL)),  # 128 x 128 table, align_corners, class token
           ("naflexvit_so150m2_patch16_reg1_map", dict(SMALL)),  # no qkv bias, one register
           # the other projections: a conv with a norm after it and pre_norm (bias-free); (C, ph, pw) patches
           ("naflexvit_base_patch16_map", dict(SMALL, embed_proj_type="conv", embed_norm_layer="layernorm",
                                               pre_norm=True)),
           ("naflexvit_so150m2_patch16_reg1_gap", dict(SMALL, patchify_channels_last=False, class_token=True,
                                                       global_pool="token", dynamic_img_pad=True)),
           # a classic ViT built as NaFlexVit: the table on the image's grid, the class token pooled
           ("vit_base_patch16_224", dict(SMALL, use_naflex=True, img_size=64))),
    *cases("qwen3_vit",
           ("qwen3_vit_88m", dict(SMALL, img_size=64, pos_embed_grid_size=6, num_classes=5)),  # table 6 -> 4
           ("qwen3_vit_306m_merge", dict(SMALL, img_size=(64, 96), pos_embed_grid_size=4, out_features=48,
                                         num_classes=5)),
           ("qwen3_vit_416m_enc", dict(SMALL, img_size=64, pos_embed_grid_size=4, out_features=40))),  # merger
    *cases("gemma4_vit",
           ("gemma4_vit_167m", dict(GEMMA, num_classes=5)),  # clamped projections
           ("gemma4_vit_570m_enc", dict(GEMMA, pretrained_cfg_overlay=dict(input_size=(3, 96, 144))))),
    *cases("deepseek_vit",
           ("deepseek_vit_412m", dict(SMALL, img_size=56, num_classes=5)),
           ("deepseek_vit_412m_align", dict(SMALL, img_size=56, out_features=32, num_classes=5)),  # 4x4 -> 6x6
           ("deepseek_vit_412m_enc", dict(SMALL, img_size=(70, 42), out_features=32))),
    # Swin v1 (tests/test_timm_swin.py's small layouts: a padded grid, per-stage windows)
    *cases("swin_transformer", *SWIN_SMALL.items()),
]


@pytest.mark.parametrize("case", OUTPUTS, ids=ids(OUTPUTS))
def test_outputs_match_timm(case):
    feed = FEEDS.get(case.family, PLAIN)
    tm = feed.perturb(timm.create_model(case.name, pretrained=False, **case.kw)).eval()
    model, report = assert_outputs_match_timm(tm, inputs=feed.inputs)
    if feed.check is not None:
        feed.check(model, report, tm, model.spec)


# --- FLOPs equal fvcore's on timm's own model (unfused attention) ------------------------------------

def _rms_norm_is_the_difference(spec, full, theirs):
    """fvcore counts nothing for timm's hand-written RMSNorm (pow, mean, rsqrt), vitlab 4 per element
    for aten::rms_norm; what remains is Gemma's RoPE angles, a matmul in timm. The spec's derived
    count equals its full one in every key, the RoPE tables built in the embedding included."""
    rms = full.by_operator.get("aten::rms_norm", 0)
    assert abs(full.flops - rms - theirs) <= 1e-4 * theirs, (full.flops, rms, theirs)
    assert_derived_equals_full(spec)


def _counted_on_meta(spec, full, theirs):
    assert full.device == "meta"  # plain convs: the meta-device convolution stand-in, nothing allocated


FLOPS_CHECKS = {"vit_small_resnet26d_224": _counted_on_meta, "vit_base_mci_224": _counted_on_meta,
                **dict.fromkeys(("qwen3_vit_88m", "qwen3_vit_306m_merge", "gemma4_vit_167m", "gemma4_vit_570m_enc",
                                 "deepseek_vit_412m", "deepseek_vit_412m_align"), _rms_norm_is_the_difference)}

FLOPS = [  # full width where the count is fast
    *cases("deit", ("deit_tiny_distilled_patch16_224", {}), ("deit_small_distilled_patch16_224", dict(depth=2))),
    *cases("vision_transformer",
           ("beit3_base_patch16_224", dict(depth=1)),
           ("vit_small_patch16_18x2_224", dict(depth=1)),
           ("vit_base_patch16_18x2_224", dict(depth=1, img_size=112)),
           ("vit_dwee_patch16_reg1_gap_256", dict(depth=2)),
           ("vit_dlittle_patch16_reg1_gap_256", dict(depth=1, img_size=128)),
           ("vit_dpwee_patch16_reg1_gap_256", dict(depth=2))),
    *cases("eva",
           ("eva02_tiny_patch14_224", {}),
           ("vit_small_patch16_dinov3", dict(depth=2)),
           ("vit_pe_core_tiny_patch16_384", dict(depth=2)),
           ("vit_small_patch16_rope_mixed_224", dict(depth=2)),
           ("vit_base_patch16_rope_mixed_ape_224", dict(depth=1)),
           ("vit_base_patch16_sapiens2", dict(depth=2, num_kv_heads=(12, 6), img_size=(128, 96))),
           ("vit_large_patch16_sapiens2", dict(depth=2, num_kv_heads=(8, 16), img_size=(96, 64)))),
    *cases("beit", ("beit_base_patch16_224", dict(depth=1)), ("beitv2_large_patch16_224", dict(depth=1))),
    *cases("vision_transformer_relpos",
           ("test_vit_relpos", {}),
           ("vit_relpos_medium_patch16_cls_224", dict(depth=1)),
           ("vit_srelpos_small_patch16_224", dict(depth=2))),
    *cases("cait",
           ("cait_xxs24_224", {}),
           ("cait_s24_224", dict(depth=2)),
           ("cait_xs24_384", dict(depth=1, img_size=64, depth_token_only=1, mlp_ratio_token_only=2.0))),
    *cases("convit",
           ("convit_tiny", dict(depth=3, local_up_to_layer=2)),  # 224 px
           ("convit_small", dict(depth=2, local_up_to_layer=1, img_size=96, global_pool="avg"))),
    *cases("vision_transformer_sam",
           ("samvit_base_patch16", dict(SAM_PADDED, neck_chans=32)),
           ("samvit_base_patch16_224", dict(depth=2))),  # full width at 224 px, 14 x 14 windows = the grid
    *cases("vision_transformer_hybrid",
           ("vit_tiny_r_s16_p8_224", dict(depth=2)),  # StdConv2dSame: see test_std_conv_same_counted_on_meta
           ("vit_small_resnet26d_224", dict(depth=1, img_size=128)),
           ("vit_base_mci_224", dict(depth=1))),
    *cases("xcit", ("xcit_nano_12_p16_224", dict(depth=2)), ("xcit_tiny_12_p8_224", dict(depth=1))),
    *cases("naflexvit",  # full width at the default size (384 / 512 px), one block
           ("naflexvit_base_patch16_gap", dict(depth=1)),  # bicubic resampling: vitlab counts it, fvcore does not
           ("naflexvit_base_patch16_parfac_gap", dict(depth=1)),
           ("naflexvit_base_patch16_siglip", dict(depth=1)),
           ("naflexvit_base_patch16_radio_v3", dict(depth=1))),
    # full width where fvcore's RMSNorm blind spot (FLOPS_CHECKS) is small against the matmuls
    *cases("qwen3_vit",
           ("qwen3_vit_88m", dict(SMALL, img_size=64, pos_embed_grid_size=6, num_classes=5)),
           ("qwen3_vit_306m_merge", dict(depth=1, img_size=64, out_features=64, num_classes=5))),
    *cases("gemma4_vit",
           ("gemma4_vit_167m", dict(depth=1, position_embedding_size=16, num_classes=5,
                                    pretrained_cfg_overlay=dict(input_size=(3, 96, 96)))),
           ("gemma4_vit_570m_enc", dict(depth=1, position_embedding_size=16,
                                        pretrained_cfg_overlay=dict(input_size=(3, 96, 96))))),
    *cases("deepseek_vit",
           ("deepseek_vit_412m", dict(depth=1, img_size=56, num_classes=5)),
           ("deepseek_vit_412m_align", dict(depth=1, img_size=56, out_features=64, num_classes=5))),
    *cases("swin_transformer", ("swin_tiny_patch4_window7_224", {}), ("swin_s3_tiny_224", SWIN_SMALL["swin_s3_tiny_224"])),
]


@pytest.mark.parametrize("case", FLOPS, ids=ids(FLOPS))
def test_flops_equal_fvcore_on_timm(case):
    spec, full, theirs = assert_flops_match_fvcore(case.name, **case.kw)
    if case.name in FLOPS_CHECKS:
        FLOPS_CHECKS[case.name](spec, full, theirs)


# --- derived counts equal the full trace --------------------------------------------------------------

def _cait_stage_tokens(spec, full):
    # the patches enter the first stage alone; the class token joins them for the second
    patches = (spec.img_hw[0] // 16) * (spec.img_hw[1] // 16)
    assert full.stage_tokens == [patches, patches + 1] and full.tokens_out == patches + 1


DERIVED = [  # the VLM towers: with their FLOPs (FLOPS_CHECKS)
    *cases("deit",
           ("deit_tiny_distilled_patch16_224", dict(depth=3, img_size=64)),
           ("deit_base_distilled_patch16_384", dict(SMALL, img_size=64))),
    *cases("vision_transformer",
           ("vit_small_patch16_18x2_224", dict(depth=2, img_size=64)),
           ("vit_dwee_patch16_reg1_gap_256", dict(depth=3, img_size=64)),  # blocks differ in λ_init only
           ("vit_dpwee_patch16_reg1_gap_256", dict(depth=2, img_size=64))),
    *cases("eva",
           ("vit_small_patch16_rope_mixed_224", dict(depth=3, img_size=64)),  # per-block tables in each block
           # Sapiens2's per-block kv heads (``layers``) and attention-only layer scale; its DINOv3 RoPE
           # tables, built once in the embedding, are counted by the derived trace too
           ("vit_large_patch16_sapiens2", dict(depth=4, num_kv_heads=(16, 8, 4, 16), img_size=64))),
    *cases("beit", ("beit_base_patch16_224", dict(depth=2, img_size=64)),
           ("beitv2_large_patch16_224", dict(depth=2, img_size=64))),
    *cases("vision_transformer_relpos",
           ("test_vit_relpos", dict(depth=3)),
           ("vit_relpos_medium_patch16_cls_224", dict(depth=2, img_size=64)),
           ("vit_srelpos_small_patch16_224", dict(depth=2, img_size=64))),  # a bias computed once, in the embedding
    *cases("cait",
           ("cait_xxs24_224", dict(depth=3, img_size=64)),
           ("cait_s24_224", dict(depth=2, img_size=96, depth_token_only=3))),
    *cases("convit",
           ("convit_tiny", dict(depth=4, local_up_to_layer=2, img_size=64)),
           ("convit_small", dict(depth=3, local_up_to_layer=1, img_size=64, embed_dim=16))),
    *cases("vision_transformer_sam",
           ("samvit_base_patch16", SAM_PADDED),
           ("samvit_base_patch16_224", dict(embed_dim=64, num_heads=2, depth=3, img_size=64, window_size=2,
                                            global_attn_indexes=[1]))),
    *cases("vision_transformer_hybrid",
           ("vit_tiny_r_s16_p8_224", dict(depth=3, img_size=64)),
           ("vit_base_mci_224", dict(depth=2, img_size=64))),
    *cases("xcit",
           ("xcit_nano_12_p16_224", dict(depth=3, img_size=64)),
           ("xcit_tiny_24_p8_224", dict(depth=2, img_size=(64, 48), cls_attn_layers=3))),
    *cases("naflexvit",
           ("naflexvit_base_patch16_par_gap", dict(SMALL, depth=3)),
           ("naflexvit_base_patch16_parfac_gap", dict(SMALL, depth=3)),
           ("naflexvit_so150m2_patch16_reg1_map", dict(SMALL, depth=3))),
    # Swin v1 (tests/test_timm_swin.py's small layouts: a padded grid, per-stage windows)
    *cases("swin_transformer", *SWIN_SMALL.items()),
]


@pytest.mark.parametrize("case", DERIVED, ids=ids(DERIVED))
def test_derived_equals_full(case):
    spec = spec_from_timm(case.name, **case.kw)
    if case.name == "vit_large_patch16_sapiens2":
        assert len(spec.layers) == 2
    # Swin: the whole model's trace also records the integer arithmetic of its padded, shifted grids
    # as free operators (neg, sub, mul: 0 FLOPs); blocks traced alone get those sizes as constants
    also = {"free_ops", "free_why"} if case.family == "swin_transformer" else set()
    full = assert_derived_equals_full(spec, also)
    if case.family == "cait":
        _cait_stage_tokens(spec, full)


# --- back to timm ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trip:
    family: str
    name: str
    kw: dict
    timm_cls: str | None = None  # the class the spec goes back to, when it is not the family's obvious one


def _other_size(spec):
    return images(spec), torch.randn(1, 3, 80, 48, generator=torch.Generator().manual_seed(3))


TRIP_FEEDS = {  # what randomize leaves alone or what timm ties together, and the inputs
    "vision_transformer": Feed(one_layer_scale_if_parallel),
    "vision_transformer_hybrid": Feed(randomize_stats),
    "xcit": Feed(lambda m: randomize_stats(m, mean=0.2)),
    "naflexvit": Feed(inputs=_other_size),
    **dict.fromkeys(("qwen3_vit", "gemma4_vit", "deepseek_vit"), Feed(perturb_buffers, inputs=vlm_images)),
}


def trips(family, *rows):
    return [Trip(family, *row) for row in rows]


ROUND_TRIPS = [
    *trips("deit",
           ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64)),
           ("deit_base_distilled_patch16_384", dict(SMALL, img_size=64, num_classes=0))),
    *trips("vision_transformer",
           ("beit3_base_patch16_224", dict(SMALL, img_size=64)),
           ("vit_small_patch16_18x2_224", dict(SMALL, img_size=64)),
           ("vit_base_patch16_18x2_224", dict(SMALL, img_size=64, mlp_layer=timm.layers.SwiGLU, act_layer="silu",
                                              attn_layer="diff", block_fn=THREE_THINGS)),
           ("vit_dwee_patch16_reg1_gap_256", dict(depth=2, img_size=64, qk_norm=True, scale_attn_norm=True)),
           ("vit_dlittle_patch16_reg1_gap_256", dict(depth=2, img_size=64, proj_bias=False)),
           ("vit_dpwee_patch16_reg1_gap_256", dict(depth=2, img_size=64, qkv_bias=False, qk_norm=True))),
    *trips("eva",
           ("eva02_tiny_patch14_224", dict(depth=2, img_size=70), "Eva"),  # axial RoPE, SwiGLU with norm
           ("eva02_base_patch16_clip_224", dict(SMALL, img_size=64), "Eva"),  # sub-LN, q / k / v apart in timm
           ("vit_small_patch16_dinov3", dict(depth=2, img_size=64), "Eva"),  # DINOv3 RoPE, registers
           ("vit_pe_core_tiny_patch16_384", dict(depth=2, img_size=64), "Eva"),  # attention pool, every token
           ("vit_base_patch16_rope_ape_224", dict(SMALL, img_size=64), "Eva"),  # RoPE plus a learned table
           ("vit_small_patch16_rope_mixed_224", dict(SMALL, img_size=64), "Eva"),  # learned frequencies
           # Sapiens2: grouped-query middle blocks (per-block num_kv_heads, q / k / v apart and of unequal
           # sizes, a real key bias), attention-only layer scale, RMSNorm, registers
           ("vit_base_patch16_sapiens2", dict(depth=3, embed_dim=64, num_heads=4, num_kv_heads=(4, 2, 4),
                                              img_size=(64, 48)), "Eva"),
           ("vit_large_patch16_sapiens2", dict(depth=4, embed_dim=96, num_heads=4, num_kv_heads=(4, 1, 2, 4),
                                               img_size=64), "Eva"),
           ("vit_giant_patch16_sapiens2", dict(depth=3, embed_dim=48, num_heads=4, num_kv_heads=(2, 4, 4),
                                               img_size=32), "Eva"),  # grouped-query in block 0: the spec's own
           # grouped-query in every block and no qkv bias: AttentionRope without biases
           ("vit_small_patch16_dinov3", dict(depth=2, img_size=64, attn_type="rope", qkv_fused=False,
                                             num_kv_heads=2), "Eva")),
    *trips("beit",
           ("beit_base_patch16_224", dict(SMALL, img_size=64), "Beit"),  # avg pool, fc_norm
           ("beitv2_large_patch16_224", dict(SMALL, img_size=(64, 48)), "Beit"),  # a non-square grid
           ("beit_large_patch16_512", dict(SMALL, img_size=64, global_pool="token"), "Beit")),  # final norm
    *trips("vision_transformer_relpos",
           ("test_vit_relpos", {}, "VisionTransformerRelPos"),  # a bias MLP per block, fc_norm
           ("vit_srelpos_small_patch16_224", dict(SMALL, img_size=64, rel_pos_dim=32), "VisionTransformerRelPos"),
           ("vit_relpos_medium_patch16_cls_224", dict(SMALL, img_size=(64, 48)), "VisionTransformerRelPos"),
           ("vit_relpos_base_patch16_rpn_224", dict(SMALL, img_size=64), "VisionTransformerRelPos"),  # post-norm
           ("vit_relpos_small_patch16_224", dict(SMALL, img_size=64, rel_pos_type="bias"), "VisionTransformerRelPos"),
           # a relpos table with the class token is Beit's: timm's key bias dropped, which softmax ignores
           ("vit_relpos_small_patch16_224", dict(SMALL, img_size=64, rel_pos_type="bias", class_token=True,
                                                 global_pool="token"), "Beit")),
    *trips("cait",
           ("cait_xxs24_224", dict(depth=2, img_size=64), "Cait"),
           ("cait_s36_384", dict(depth=1, img_size=(64, 48), depth_token_only=1, mlp_ratio_token_only=2.0,
                                 global_pool="avg"), "Cait")),
    *trips("convit",
           ("convit_tiny", dict(depth=3, local_up_to_layer=2, img_size=64)),
           ("convit_base", dict(depth=2, local_up_to_layer=1, img_size=48, embed_dim=8, qkv_bias=True, num_classes=0,
                                locality_strength=0.5))),
    *trips("vision_transformer_sam",
           ("samvit_base_patch16", dict(SAM_PADDED, neck_chans=32)),
           ("samvit_base_patch16_224", dict(embed_dim=64, num_heads=2, depth=2, img_size=64, window_size=2,
                                            global_attn_indexes=[0]))),
    *trips("vision_transformer_hybrid",
           ("vit_tiny_r_s16_p8_224", dict(depth=2, img_size=64)),
           ("vit_small_resnet50d_s16_224", HYBRID),
           ("vit_base_mci_224", dict(depth=1, img_size=64))),
    *trips("xcit",
           ("xcit_nano_12_p16_224", dict(depth=2, img_size=64)),
           ("xcit_tiny_24_p8_384", dict(depth=1, img_size=64, global_pool="avg", num_classes=10))),
    *trips("naflexvit",  # a table on the default image's grid, which timm then derives from img_size (and keeps)
           ("naflexvit_base_patch16_gap", dict(SMALL, pos_embed_grid_size=(24, 24)), "NaFlexVit"),
           ("naflexvit_base_patch16_parfac_gap", dict(SMALL, pos_embed_grid_size=(24, 24)), "NaFlexVit"),
           ("naflexvit_base_patch16_radio_v3", dict(SMALL, pos_embed_grid_size=(32, 32)), "NaFlexVit"),
           ("naflexvit_base_patch16_siglip", dict(SMALL, pos_embed_grid_size=(24, 24), embed_proj_type="conv",
                                                  embed_norm_layer="layernorm", pre_norm=True), "NaFlexVit"),
           ("naflexvit_base_patch16_map", dict(SMALL, pos_embed_grid_size=(24, 24), patchify_channels_last=False),
            "NaFlexVit")),
    # every VLM spec goes back as the family's classifier class, which holds encoders too
    *trips("qwen3_vit",
           ("qwen3_vit_88m_merge", dict(SMALL, img_size=64, pos_embed_grid_size=4, out_features=48, num_classes=5)),
           ("qwen3_vit_306m_enc", dict(SMALL, img_size=(64, 96), pos_embed_grid_size=5, out_features=0))),  # no fc2
    *trips("gemma4_vit",  # at timm's 768 px: it keeps no size
           ("gemma4_vit_167m", dict(SMALL, head_dim=32, intermediate_size=128, position_embedding_size=48)),
           ("gemma4_vit_570m_enc", dict(SMALL, depth=1, head_dim=32, intermediate_size=128,
                                        position_embedding_size=48))),
    *trips("deepseek_vit",
           ("deepseek_vit_412m", dict(SMALL, img_size=56, num_classes=5)),
           ("deepseek_vit_412m_enc", dict(SMALL, img_size=(70, 42), out_features=32, dynamic_img_pad=True))),
    *trips("swin_transformer", *SWIN_SMALL.items()),
]


@pytest.mark.parametrize("trip", ROUND_TRIPS, ids=ids(ROUND_TRIPS))
def test_round_trip_through_timm(trip):
    feed = TRIP_FEEDS.get(trip.family)
    assert_round_trip(spec_from_timm(trip.name, **trip.kw), prepare=feed and feed.perturb,
                      inputs=feed and feed.inputs, timm_cls=trip.timm_cls)


# --- every family, every check, at least two models ---------------------------------------------------

# The hierarchical families run the same four checks in their own modules, where each model needs
# its own builder or exact figure (timm's config classes, fvcore's known differences): each module's
# ``CHECKED`` names the models its tests run, per check ({family: {check: models}} when it holds two).
ELSEWHERE = {
    "swin_transformer_v2": "test_timm_swin_v2", "swin_transformer_v2_cr": "test_timm_swin_v2",
    "pvt_v2": "test_timm_pvt_v2", "twins": "test_timm_twins", "levit": "test_timm_levit",
    "mvitv2": "test_timm_mvitv2", "hiera": "test_timm_hiera", "hieradet_sam2": "test_timm_hieradet_sam2",
    "nest": "test_timm_nest", "coat": "test_timm_coat", "tiny_vit": "test_timm_tiny_vit", "volo": "test_timm_volo",
    "davit": "test_timm_davit", "gcvit": "test_timm_gcvit",
}


def _checked_elsewhere(family: str, table: str) -> set[str]:
    import importlib

    checked = importlib.import_module(ELSEWHERE[family]).CHECKED
    return set(checked.get(family, checked)[table])


@pytest.mark.parametrize("table", ["OUTPUTS", "FLOPS", "DERIVED", "ROUND_TRIPS"])
def test_every_family_is_checked_on_two_models(table):
    from vitlab.timm_interop import zoo

    rows = globals()[table]
    models = {f: {c.name for c in rows if c.family == f} for f in zoo.families()}
    models.update({f: _checked_elsewhere(f, table) for f in models if f in ELSEWHERE})
    if table == "DERIVED":  # the VLM towers' derived counts are checked with their FLOPs
        models.update({f: {c.name for c in FLOPS if c.family == f} for f in ("qwen3_vit", "gemma4_vit", "deepseek_vit")})
    assert {f: len(names) for f, names in models.items() if len(names) < 2} == {}
