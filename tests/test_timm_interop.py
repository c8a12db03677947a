"""timm interop (issue 4): timm VisionTransformer -> spec, timm weights -> vitlab models (renaming,
fused projections, prefix tokens, resampling, partial loads), vitlab -> timm, checkpoint files,
``vitlab from-timm``. Every timm model is created with ``pretrained=False``; every file is written
here into ``tmp_path``."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

timm = pytest.importorskip("timm")

from timm.layers import AttentionPoolLatent, GluMlp, LayerNorm, RmsNorm, SwiGLU, SwiGLUPacked  # noqa: E402
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import (  # noqa: E402
    ParallelScalingBlock,
    ResPostBlock,
    VisionTransformer,
)

import vitlab  # noqa: E402
from vitlab import SpecError, WeightsError, build_model, load_spec  # noqa: E402
from vitlab.timm_interop import (  # noqa: E402
    LoadReport,
    load_timm_weights,
    spec_from_timm,
    timm_kwargs,
    to_timm_state_dict,
)

from timm_reference import outputs, randomize  # noqa: E402

BASE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """Fast initialisation (a clamped normal instead of erfinv-based truncated normals) for torch
    and timm, and one intra-op thread: values are overwritten or compared, never judged."""
    import timm.layers.attention_pool as tap
    import timm.models.vision_transformer as tvit

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        with torch.no_grad():
            return tensor.normal_(mean, std).clamp_(mean - 2 * std, mean + 2 * std)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", trunc_normal_)
    monkeypatch.setattr(tvit, "trunc_normal_", trunc_normal_)
    monkeypatch.setattr(tap, "trunc_normal_tf_", trunc_normal_)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(ours, theirs, x, atol=ATOL):
    a, b = outputs(ours, x), outputs(theirs, x)
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g}"


def timm_vit(**kw) -> VisionTransformer:
    return randomize(VisionTransformer(**{**BASE, **kw})).eval()


def converted(tm: nn.Module):
    """spec_from_timm -> build_model -> load_timm_weights (strict)."""
    spec = spec_from_timm(tm)
    model = build_model(spec)
    report = load_timm_weights(model, tm)
    assert report.ok, str(report)
    return model.eval(), spec, report


def images(spec, batch=2, seed=0):
    return torch.randn(batch, spec.in_chans, *spec.img_hw, generator=torch.Generator().manual_seed(seed))


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the named models, full size -------------------------------------------------------------

NAMED = [
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch32_224",
    "deit_tiny_patch16_224",
    "vit_base_patch16_clip_224",
    "vit_small_patch14_dinov2",
    "vit_medium_patch16_gap_256",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMED)
def test_named_models_full_size_match_timm(name):
    tm = timm.create_model(name, pretrained=False).eval()
    model, spec, report = converted(tm)
    assert spec.name == name and spec.depth == len(tm.blocks) and spec.embed_dim == tm.embed_dim
    assert report.loaded and not (report.converted or report.resampled)
    assert_same(model, tm, images(spec, batch=1))


# --- a broad sample of timm's VisionTransformer models ---------------------------------------

KNOWN_UNSUPPORTED = (
    "not divisible by patch size",
)


def _sample_names() -> list[str]:
    names = timm.list_models(module="vision_transformer") + timm.list_models(module="deit")
    names += timm.list_models(module="vision_transformer_hybrid")
    return sorted(set(names))


@functools.lru_cache(maxsize=None)
def _classified():
    """Every VisionTransformer-class timm model, built on the meta device with one block:
    supported (grouped by structure, sizes aside) or unsupported with the error."""
    groups: dict[str, list[str]] = {}
    unsupported: dict[str, str] = {}
    for name in _sample_names():
        tm = timm.create_model(name, pretrained=False, device="meta", depth=1)
        if not isinstance(tm, VisionTransformer):
            continue
        try:
            spec = spec_from_timm(tm)
        except SpecError as exc:
            unsupported[name] = str(exc)
            continue
        d = spec.to_dict()
        for k in ("name", "img_size", "patch_size", "num_classes", "embed_dim", "num_heads", "mlp_ratio"):
            d.pop(k)
        groups.setdefault(json.dumps(d, sort_keys=True), []).append(name)
    return groups, unsupported


def test_broad_sample_classifies_every_vit_cleanly():
    """Each VisionTransformer converts, or fails with a SpecError naming a known unsupported
    feature (any other exception fails the test)."""
    groups, unsupported = _classified()
    supported = sum(len(v) for v in groups.values())
    assert supported >= 150, (supported, len(unsupported))
    for name, msg in unsupported.items():
        assert f"timm model '{name}'" in msg and "unsupported" in msg
        assert any(k in msg for k in KNOWN_UNSUPPORTED), msg
    print(f"\n{supported} timm VisionTransformer models convertible in {len(groups)} structures; "
          f"{len(unsupported)} unsupported")


def test_broad_sample_outputs_match_timm():
    """One model per distinct structure, rebuilt small (one block, 8-wide heads, a 4x3 patch grid)
    with every weight perturbed: the converted model gives timm's outputs."""
    groups, _ = _classified()
    failures = []
    for names in groups.values():
        name = names[0]
        meta = timm.create_model(name, pretrained=False, device="meta", depth=1)
        if hasattr(meta.patch_embed, "backbone"):
            continue  # a CNN stem needs real images: tests/test_zoo_hybrid.py
        ph, pw = meta.patch_embed.patch_size
        b0 = meta.blocks[0]
        attn = b0.attn if hasattr(b0, "attn") else b0.attns[0].attn if hasattr(b0, "attns") else b0
        heads = attn.num_heads
        kw = dict(depth=1, img_size=(4 * ph, 3 * pw), embed_dim=8 * heads)
        if meta.num_classes:
            kw["num_classes"] = 7
        tm = randomize(timm.create_model(name, pretrained=False, **kw)).eval()
        model, spec, _ = converted(tm)
        a, b = outputs(model, images(spec)), outputs(tm, images(spec))
        diff = (a - b).abs().max().item()
        if a.shape != b.shape or diff > ATOL:
            failures.append((name, tuple(a.shape), tuple(b.shape), diff))
    assert not failures


# --- each feature, on small hand-built timm models -------------------------------------------

LN5 = functools.partial(nn.LayerNorm, eps=1e-5)
FEATURES = {
    "default": {},
    "qk_norm": dict(qk_norm=True),
    "rmsnorm_qk_norm": dict(qk_norm=True, norm_layer="rmsnorm"),
    "rmsnorm_eps": dict(norm_layer=functools.partial(RmsNorm, eps=1e-5)),
    "layernorm_no_bias": dict(norm_layer=functools.partial(LayerNorm, bias=False)),
    "clip": dict(norm_layer=LN5, act_layer="quick_gelu", pre_norm=True),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
    "silu": dict(act_layer="silu"),
    "no_bias": dict(qkv_bias=False, proj_bias=False),
    "layer_scale": dict(init_values=1e-5),
    "swiglu": dict(mlp_layer=SwiGLU, act_layer="silu", mlp_ratio=8 / 3),
    "swiglu_packed": dict(mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=2 * 8 / 3),
    "scale_mlp_norm": dict(scale_mlp_norm=True),
    "scale_attn_norm": dict(scale_attn_norm=True, scale_mlp_norm=True),  # BEiT-3's sub-LN: mhsa_subln
    "respost": dict(block_fn=ResPostBlock, init_values=0.1),
    "parallel": dict(block_fn=ParallelScalingBlock),
    "parallel_no_qkv_bias": dict(block_fn=ParallelScalingBlock, qkv_bias=False, qk_norm=True, init_values=1e-3),
    "parallel_no_proj_bias": dict(block_fn=ParallelScalingBlock, proj_bias=False),
    "parallel_fused_out": dict(block_fn=functools.partial(ParallelScalingBlock, fuse_out_proj=True)),
    "parallel_fused_out_no_bias": dict(block_fn=functools.partial(ParallelScalingBlock, fuse_out_proj=True),
                                       proj_bias=False, qkv_bias=False),
    "patch_embed_norm": dict(embed_norm_layer="layernorm"),
    "rms_everywhere": dict(norm_layer="rmsnorm", embed_norm_layer="rmsnorm", pre_norm=True),
    "no_final_norm": dict(final_norm=False),
    "avg_fc_norm": dict(global_pool="avg"),
    "avg_no_fc_norm": dict(global_pool="avg", fc_norm=False),
    "avg_no_class_token": dict(class_token=False, global_pool="avg"),
    "token_fc_norm": dict(fc_norm=True),
    "no_pool_tokens": dict(global_pool="", num_classes=0),
    "map": dict(global_pool="map"),
    "map_include_prefix": dict(global_pool="map", pool_include_prefix=True, reg_tokens=2),
    "map_registers_no_class": dict(class_token=False, reg_tokens=4, no_embed_class=True, global_pool="map"),
    "registers_no_embed_class": dict(reg_tokens=4, no_embed_class=True),
    "registers_embedded": dict(reg_tokens=2),
    "no_pos_embed": dict(pos_embed="none"),
    "dynamic_img_size": dict(dynamic_img_size=True, reg_tokens=1, no_embed_class=True),
    "non_square": dict(img_size=(32, 24), patch_size=(8, 4)),
    "cropping": dict(img_size=36),  # timm's conv drops the last 4 pixels: a stride-8 conv
    "one_channel": dict(in_chans=1),
    "head_free": dict(num_classes=0),
}


@pytest.mark.parametrize("kw", FEATURES.values(), ids=FEATURES.keys())
def test_feature_matches_timm(kw):
    tm = timm_vit(**kw)
    model, spec, _ = converted(tm)
    assert_same(model, tm, images(spec))


@pytest.mark.parametrize("size", [(48, 40), (24, 32)])
def test_dynamic_img_size_matches_timm_at_other_sizes(size):
    tm = timm_vit(dynamic_img_size=True, reg_tokens=1)
    model, spec, _ = converted(tm)
    assert spec.dynamic_img_size
    assert_same(model, tm, torch.randn(2, 3, *size))


def test_dynamic_img_pad_matches_timm():
    tm = timm_vit(dynamic_img_size=True, dynamic_img_pad=True)
    model, spec, _ = converted(tm)
    assert spec.patch_embed.params["pad"] is True
    assert_same(model, tm, torch.randn(2, 3, 36, 30))


def test_spec_fields_read_from_the_instance():
    tm = VisionTransformer(**BASE, reg_tokens=3, no_embed_class=True, init_values=1e-4, qk_norm=True,
                           drop_rate=0.1, pos_drop_rate=0.2, proj_drop_rate=0.05, attn_drop_rate=0.15,
                           drop_path_rate=0.3, norm_layer=LN5, global_pool="avg")
    spec = spec_from_timm(tm)
    assert (spec.reg_tokens, spec.class_token, spec.pos_embed.params["include_prefix"]) == (3, True, False)
    assert spec.block.params["init_values"] == 1e-4
    assert spec.norm.params == {"eps": 1e-5, "bias": True}
    assert spec.pool.name == "avg" and spec.pool.params["norm"] and not spec.final_norm
    assert spec.attention.params["attn_drop"] == 0.15
    assert (spec.drop_rate, spec.pos_drop_rate, spec.proj_drop_rate, spec.drop_path_rate) == (0.1, 0.2, 0.05, 0.3)


def test_spec_from_timm_by_name_allocates_nothing():
    spec = spec_from_timm("vit_giant_patch14_224")  # ~1B parameters, built on the meta device
    assert (spec.embed_dim, spec.depth, spec.patch_size) == (1408, 40, 14)
    assert spec_from_timm("vit_tiny_patch16_224", depth=3).depth == 3
    with pytest.raises(SpecError, match="did you mean 'vit_small_patch16_224'"):
        spec_from_timm("vit_smal_patch16_224")


UNSUPPORTED = {
    "avgmax": (dict(global_pool="avgmax"), "global_pool 'avgmax'"),
    "max": (dict(global_pool="max"), "global_pool 'max'"),
    "prr": (dict(global_pool="prr"), "AttentionPoolPrr"),
    "patch_drop": (dict(patch_drop_rate=0.1), "patch dropout"),
    "glu_sigmoid": (dict(mlp_layer=GluMlp, act_layer="sigmoid"), "gated MLP with Sigmoid gate"),
    "swiglu_gelu": (dict(mlp_layer=SwiGLU), "gated MLP with GELU gate"),
    "mixed_norms": (dict(embed_norm_layer="rmsnorm"), "mix of norm layers"),
    "avg_over_prefix": (dict(global_pool="avg", pool_include_prefix=True), "pool_include_prefix"),
    "cropping_dynamic": (dict(img_size=36, dynamic_img_size=True), "not divisible by patch size"),
    "map_fc_norm": (dict(global_pool="map", fc_norm=True), "fc_norm after map pooling"),
    "mish": (dict(act_layer="mish"), "activation"),
}


@pytest.mark.parametrize("kw, feature", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_feature_is_named(kw, feature):
    tm = VisionTransformer(**{**BASE, **kw}, device="meta")
    with pytest.raises(SpecError, match="unsupported") as info:
        spec_from_timm(tm)
    assert feature in str(info.value)


def test_not_a_vision_transformer_is_refused():
    with pytest.raises(SpecError, match="is not a timm VisionTransformer"):
        spec_from_timm(timm.create_model("resnet18", pretrained=False, device="meta"))
    with pytest.raises(SpecError, match="distilled training mode"):
        tm = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, device="meta")
        tm.set_distilled_training(True)
        spec_from_timm(tm)


def test_map_pool_equals_attention_pool_latent():
    """The 'map' component computes timm's AttentionPoolLatent, with its options."""
    spec = load_spec({**BASE, "reg_tokens": 1, "attention": {"name": "mhsa", "params": {"qk_norm": True}},
                      "pool": {"name": "map", "params": {"latent_len": 3, "reduce": "avg", "qk_norm": True,
                                                         "mlp_ratio": 2.0, "act": "gelu_tanh"}}})
    model = build_model(spec, seed=0).eval()
    ap = randomize(AttentionPoolLatent(32, num_heads=2, mlp_ratio=2.0, latent_len=3, pool_type="avg", qk_norm=True,
                                       norm_layer=LayerNorm, act_layer=nn.GELU)).eval()
    ap.mlp.act = nn.GELU(approximate="tanh")
    model.pool.load_state_dict(ap.state_dict())
    tokens = torch.randn(2, 2 + 16, 32)
    with torch.no_grad():
        assert torch.allclose(model.pool(tokens), ap(tokens[:, 2:]), atol=ATOL)


# --- position embeddings: resampling and prefix tokens --------------------------------------

def test_resampled_position_embedding_matches_timm():
    tm = timm_vit()  # 4x4 grid
    spec = load_spec(spec_from_timm(tm), {"img_size": 48})  # 6x6
    model = build_model(spec)
    report = load_timm_weights(model, tm)
    assert report.ok and report.resampled == ["pos_embed.weight"]
    assert any("4x4 -> 6x6" in n for n in report.notes)
    expected = resample_abs_pos_embed(tm.pos_embed.detach(), (6, 6), (4, 4), num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.weight.detach(), expected)
    tm.set_input_size(img_size=48)  # timm's own resize of the same table
    assert_same(model, tm, images(spec))


def test_resampling_from_a_state_dict_infers_the_grid():
    """No model to ask: the grid and prefix rows are inferred from shapes (registers, patches-only
    table, non-square target)."""
    tm = timm_vit(reg_tokens=2, no_embed_class=True, img_size=48)  # 6x6 grid, table over patches only
    spec = load_spec(spec_from_timm(tm), {"img_size": [32, 24]})  # 4x3
    model = build_model(spec)
    report = load_timm_weights(model, dict(tm.state_dict()))
    assert report.ok and report.resampled == ["pos_embed.weight"]
    expected = resample_abs_pos_embed(tm.pos_embed.detach(), (4, 3), (6, 6), num_prefix_tokens=0)
    assert torch.equal(model.pos_embed.weight.detach(), expected)


def test_class_token_checkpoint_into_spec_with_registers():
    tm = timm_vit()
    sd = dict(tm.state_dict())
    spec = load_spec(spec_from_timm(tm), {"reg_tokens": 4})
    model = build_model(spec)
    before = state(model)
    with pytest.raises(WeightsError, match="missing: reg_token") as info:
        load_timm_weights(model, sd)
    assert "nothing was loaded" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    report = load_timm_weights(model, sd, strict=False)
    assert report.missing == ["reg_token"] and not report.unexpected and not report.mismatched
    assert report.converted == ["pos_embed.weight"]
    assert any("4 register-token rows zero" in n for n in report.notes)
    pe, src = model.pos_embed.weight.detach(), sd["pos_embed"]
    assert torch.equal(pe[:, :1], src[:, :1]) and torch.equal(pe[:, 5:], src[:, 1:])
    assert not pe[:, 1:5].any()
    assert torch.equal(model.reg_token, before["reg_token"])  # left as it was
    # timm itself cannot load this checkpoint into a model with registers
    with pytest.raises(RuntimeError, match="size mismatch"):
        VisionTransformer(**BASE, reg_tokens=4).load_state_dict(sd, strict=False)


def test_prefix_position_rows_to_patches_only_spec_and_back():
    tm = timm_vit(reg_tokens=2)  # table over class + register tokens + patches
    spec = spec_from_timm(tm)
    patches_only = load_spec(spec, {"pos_embed.params.include_prefix": False})
    model = build_model(patches_only)
    report = load_timm_weights(model, tm)
    assert report.ok and sorted(report.converted) == ["cls_token", "pos_embed.weight", "reg_token"]
    assert_same(model, tm, images(spec))  # each token's position row folded into the token

    kw = timm_kwargs(patches_only)
    assert kw["no_embed_class"] is True
    tm_back = VisionTransformer(**kw)
    tm_back.load_state_dict(to_timm_state_dict(model), strict=True)
    assert_same(tm_back, tm, images(spec))

    again = build_model(spec)  # table over prefix tokens again: their rows are zero
    report = load_timm_weights(again, tm_back)
    assert report.ok and report.converted == ["pos_embed.weight"]
    assert_same(again, tm, images(spec))


def test_checkpoint_without_registers_rows_drops_extra_prefix():
    tm = timm_vit(reg_tokens=2)
    spec = load_spec(spec_from_timm(tm), {"reg_tokens": 0})
    report = load_timm_weights(build_model(spec), tm, strict=False)
    assert report.unexpected == ["reg_token"] and report.converted == ["pos_embed.weight"]


# --- partial loads into variants -------------------------------------------------------------

def test_vit_tiny_weights_into_sincos2d_variant():
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    spec = load_spec("vit_tiny_sincos2d")
    model = build_model(spec)
    with pytest.raises(WeightsError, match="unexpected: pos_embed"):
        load_timm_weights(model, tm)
    report = load_timm_weights(model, tm, strict=False)
    assert report.unexpected == ["pos_embed"]
    assert not (report.missing or report.mismatched or report.converted or report.resampled)
    assert sorted(report.loaded) == sorted(model.state_dict())  # everything else
    assert any("sincos2d" in n for n in report.notes)
    theirs = tm.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_other_head_loads_everything_else():
    tm = timm_vit()
    spec = load_spec(spec_from_timm(tm), {"num_classes": 3})
    model = build_model(spec)
    head = model.head.weight.detach().clone()
    with pytest.raises(WeightsError, match=r"shape mismatch: head.weight: checkpoint \(5, 32\) vs model \(3, 32\)"):
        load_timm_weights(model, tm)
    report = load_timm_weights(model, tm, strict=False)
    assert sorted(k for k, *_ in report.mismatched) == ["head.bias", "head.weight"]
    assert torch.equal(model.head.weight, head)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, tm.blocks[1].mlp.fc2.weight)


def test_parts_of_fused_tensors_without_a_place_are_unexpected():
    """A fused tensor whose part has nowhere to go is reported, never silently dropped."""
    tm = timm_vit(block_fn=ParallelScalingBlock, init_values=0.1)  # qkv bias inside in_proj.bias
    spec = load_spec(spec_from_timm(tm), {"attention.params.qkv_bias": False, "block.params.init_values": None})
    with pytest.raises(WeightsError) as info:
        load_timm_weights(build_model(spec), tm)
    text = str(info.value)
    assert "unexpected: blocks.0.in_proj.bias (as blocks.0.attn.qkv.bias)" in text
    assert "unexpected: blocks.1.ls.gamma" in text and "missing:" not in text


def test_report_type_and_text():
    assert vitlab.load_timm_weights is load_timm_weights and vitlab.timm_kwargs is timm_kwargs
    report = load_timm_weights(build_model(spec_from_timm(timm_vit())), timm_vit())
    assert isinstance(report, LoadReport) and report.ok
    assert str(report).startswith("loaded ")


# --- back to timm ----------------------------------------------------------------------------

ROUND_TRIP = {
    "vit_tiny_patch16_224": {},
    "vit_tiny_parallel": {},
    "vit_tiny_swiglu": {},
    "vit_tiny_rmsnorm_qknorm": {},
    "vit_tiny_avgpool_reg4": {},
    "vit_tiny_linear_embed": {},
    "vit_tiny_nopos": {},
    "vit_tiny_sincos2d": {},
    "map_pool": {"pool.name": "map", "reg_tokens": 1},
    "respostnorm": {"block.name": "respostnorm"},
    "avg_norm": {"pool.name": "avg", "pool.params.norm": True, "final_norm": False, "class_token": False},
    "clip_like": {"pre_norm": True, "patch_embed.params.bias": False, "mlp.params.act": "quick_gelu"},
    "mlp_without_bias": {"mlp.params.bias": False},
    "parallel_without_biases": {"block.name": "parallel", "mlp.params.bias": False,
                                "attention.params.qkv_bias": False, "block.params.init_values": 0.1},
    "patches_only_dynamic": {"pos_embed.params.include_prefix": False, "dynamic_img_size": True, "reg_tokens": 2},
}


@pytest.mark.parametrize("recipe, overrides", ROUND_TRIP.items(), ids=ROUND_TRIP.keys())
def test_round_trip_through_timm(recipe, overrides):
    base = recipe if recipe.startswith("vit_tiny") else "vit_tiny_patch16_224"
    spec = load_spec(base, {"depth": 2, "img_size": 64, "num_classes": 7, **overrides})
    model = randomize(build_model(spec, seed=0)).eval()
    if spec.block.name == "parallel" and spec.block.params["init_values"]:
        with torch.no_grad():  # timm's ParallelScalingBlock has one layer scale for both branches
            for block in model.blocks:
                block.ls2.gamma.copy_(block.ls1.gamma)
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, **timm_kwargs(spec)).eval()
    tm.load_state_dict(to_timm_state_dict(model), strict=True)
    x = images(spec)
    assert_same(tm, model, x)
    back = build_model(spec_from_timm(tm))
    assert load_timm_weights(back, tm).ok
    assert_same(back, model, x)


def test_round_trip_spec_is_unchanged():
    spec = load_spec("vit_tiny_rmsnorm_qknorm", {"depth": 2, "reg_tokens": 2, "block.params.init_values": 0.5})
    tm = VisionTransformer(**timm_kwargs(spec), device="meta")
    assert spec_from_timm(tm).model_dump(exclude={"name"}) == spec.model_dump(exclude={"name"})


@pytest.mark.parametrize("overrides, why", [
    ({"block.name": "postnorm"}, "block 'postnorm'"),
    ({"block.name": "respostnorm", "block.params.init_values": 0.1}, "layer scale in a res-post-norm block"),
    ({"pool.name": "map", "pool.params.latent_len": 2}, "latent_len=2"),
    ({"pool.name": "avg", "pool.params.norm": True}, "both a final norm and a norm after average pooling"),
    ({"pre_norm": True}, "patch-embedding bias together with pre_norm"),
    ({"attention.params.proj_bias": False}, "MLP bias without attention output bias"),
    ({"mlp.params.out_bias": False}, "an MLP output bias other than its input bias"),  # not a parallel block
    ({"pos_embed.name": "sincos2d", "dynamic_img_size": True}, "sincos2d with dynamic_img_size"),
])
def test_timm_kwargs_names_what_timm_cannot_express(overrides, why):
    spec = load_spec("vit_tiny_patch16_224", overrides)
    with pytest.raises(SpecError, match="no timm VisionTransformer equivalent") as info:
        timm_kwargs(spec)
    assert why in str(info.value)


def test_to_timm_refuses_weights_without_a_place():
    spec = load_spec("vit_tiny_parallel", {"depth": 1, "block.params.init_values": 0.1})
    model = build_model(spec)
    with torch.no_grad():
        model.blocks[0].ls2.gamma.add_(1.0)
    with pytest.raises(WeightsError, match="ls1.gamma and ls2.gamma differ"):
        to_timm_state_dict(model)



@pytest.mark.parametrize("kw", [
    dict(block_fn=ParallelScalingBlock, qk_norm=True, init_values=0.1),
    dict(block_fn=ParallelScalingBlock, qkv_bias=False),  # mlp_bias
    dict(block_fn=ParallelScalingBlock, proj_bias=False),
    dict(block_fn=functools.partial(timm.models.vision_transformer.DiffParallelScalingBlock, dual_lambda=True),
         init_values=0.1),  # one out_proj over [attention | MLP], one bias
], ids=["qk_norm_ls", "no_qkv_bias", "no_proj_bias", "diff_fused_out"])
def test_parallel_table_read_both_ways_gives_timms_state_dict_back(kw):
    """``families.PARALLEL`` read forward (split, renamed) and backwards gives timm's tensors exactly."""
    tm = timm_vit(**kw)
    model, _, _ = converted(tm)
    back, theirs = to_timm_state_dict(model), tm.state_dict()
    assert sorted(back) == sorted(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)

# --- checkpoint files ------------------------------------------------------------------------

def test_safetensors_and_pickle_files(tmp_path):
    from safetensors.torch import save_file

    tm = timm_vit()
    spec = spec_from_timm(tm)
    sd = {k: v.contiguous() for k, v in tm.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    torch.save({"model": sd, "epoch": 3, "note": "training state"}, tmp_path / "w.bin")
    for name in ("w.safetensors", "w.pth", "w.bin"):
        model = build_model(spec)
        assert load_timm_weights(model, tmp_path / name).ok
        assert_same(model, tm, images(spec))
    model = build_model(spec)
    assert load_timm_weights(model, str(tmp_path / "w.pth")).ok


class _Evil:
    """Unpickling this would create a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"pos_embed": torch.zeros(1), "x": _Evil(marker)}, tmp_path / "evil.pth")
    assert not marker.exists()
    model = build_model(spec_from_timm(timm_vit()))
    with pytest.raises(WeightsError, match="refused to load"):
        load_timm_weights(model, tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
     "not a valid safetensors file"),
    (lambda p: (p / "bad.pth").write_bytes(b"this is not a torch checkpoint"), "not a readable PyTorch checkpoint"),
    (lambda p: torch.save([1, 2, 3], p / "bad.pt"), "expected a state dict"),
    (lambda p: torch.save({"a": torch.zeros(1), "b": 3}, p / "bad.pt"), "entry 'b' is a int, not a tensor"),
    (lambda p: (p / "bad.npz").write_bytes(b"x"), "not a readable .npz archive"),
    (lambda p: (p / "bad.ckpt").write_bytes(b"x"), "unknown checkpoint format '.ckpt'"),
    (lambda p: None, "no such file"),
])
def test_malformed_checkpoint_files(tmp_path, make, message):
    make(tmp_path)
    target = next(iter(sorted(tmp_path.glob("bad.*"))), tmp_path / "bad.safetensors")
    model = build_model(spec_from_timm(timm_vit()))
    before = state(model)
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_timm_weights(model, target)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm_vit().state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_timm_weights(build_model(spec_from_timm(timm_vit())), path)


def test_mismatched_checkpoint_is_refused_whole(tmp_path):
    wide = timm_vit(embed_dim=48, num_heads=3)
    model = build_model(spec_from_timm(timm_vit()))
    before = state(model)
    with pytest.raises(WeightsError) as info:
        load_timm_weights(model, wide)
    text = str(info.value)
    assert "nothing was loaded" in text and "shape mismatch: blocks.0.attn.qkv.weight" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = load_timm_weights(model, wide, strict=False)  # loads the little that fits
    assert report.loaded == ["head.bias"] and len(report.mismatched) == len(before) - 1


def test_wrong_source_types():
    model = build_model(spec_from_timm(timm_vit()))
    with pytest.raises(WeightsError, match="vitlab model"):
        load_timm_weights(model, build_model(model.spec))
    with pytest.raises(WeightsError, match="cannot load weights from a int"):
        load_timm_weights(model, 3)
    with pytest.raises(WeightsError, match="meta device"):
        load_timm_weights(model, VisionTransformer(**BASE, device="meta"))


# --- the command and the import boundary -----------------------------------------------------

def _cli():
    import vitlab.cli.timm_cmds  # noqa: F401  (registers the command)
    from vitlab.cli import cli

    return lambda *args: CliRunner().invoke(cli, [str(a) for a in args])


def test_from_timm_command(tmp_path):
    run = _cli()
    result = run("from-timm", "vit_small_patch14_dinov2")
    assert result.exit_code == 0, result.output
    import yaml

    assert load_spec(yaml.safe_load(result.stdout)) == spec_from_timm("vit_small_patch14_dinov2")
    out = tmp_path / "dino.yaml"
    assert run("from-timm", "vit_small_patch14_dinov2", "-o", out).exit_code == 0
    assert load_spec(out) == spec_from_timm("vit_small_patch14_dinov2")
    again = run("from-timm", "vit_tiny_patch16_224", "-o", out)
    assert again.exit_code == 2 and "already exists" in again.output
    assert run("from-timm", "vit_tiny_patch16_224", "-o", out, "--force").exit_code == 0
    assert load_spec(out).name == "vit_tiny_patch16_224"
    bad = run("from-timm", "vit_tiny_patch16_22")
    assert bad.exit_code == 2 and "unknown timm model" in bad.output and "did you mean" in bad.output
    unsupported = run("from-timm", "resnet18")
    assert unsupported.exit_code == 2 and "ResNet" in unsupported.output
