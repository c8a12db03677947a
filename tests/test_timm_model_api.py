"""A vitlab model has timm's model API with timm's semantics: on models read from timm (with
timm's weights) ``forward_intermediates`` equals timm's, ``create_optimizer_v2(layer_decay=...)``
gives every parameter the LR scale timm gives it, and ``resolve_data_config``,
``reset_classifier``, ``set_input_size`` and ``prune_intermediate_layers`` act as on timm's."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")
import timm.data  # noqa: E402
import timm.optim  # noqa: E402

import vitlab  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm  # noqa: E402

from timm_reference import randomize  # noqa: E402

# small read models: plain ViT, DeiT distilled, registers + GAP, EVA-02, BEiT, and PiT (staged)
MODELS = {
    "vit_tiny_patch16_224": dict(depth=3, img_size=64),
    "deit_tiny_distilled_patch16_224": dict(depth=3, img_size=64),
    "vit_betwixt_patch16_reg4_gap_256": dict(depth=3, img_size=64, embed_dim=64, num_heads=2),
    "eva02_tiny_patch14_224": dict(depth=3, img_size=56),
    "beit_base_patch16_224": dict(depth=3, img_size=64, embed_dim=64, num_heads=2),
    "pit_ti_224": dict(img_size=96),
}


def pair(name):
    """timm's model with perturbed weights and the vitlab model read from it, loaded with them."""
    tm = randomize(timm.create_model(name, pretrained=False, **MODELS[name])).eval()
    model = vitlab.build_model(spec_from_timm(tm))
    load_timm_weights(model, tm)
    return tm, model.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def models(request):
    return (request.param, *pair(request.param))


def image(model, batch=2):
    return torch.randn(batch, 3, *model.spec.img_hw, generator=torch.Generator().manual_seed(0))


def close(a, b):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-4 * max(b.abs().max().item(), 1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(output_fmt="NLC"), dict(norm=True), dict(indices=[0, -1], stop_early=True),
                                dict(indices=2, output_fmt="NLC", norm=True)])
def test_forward_intermediates_equal_timms(models, kw):
    name, tm, model = models
    if name.startswith("pit"):
        if kw.get("output_fmt") == "NLC":
            pytest.skip("timm's PiT gives NCHW only")
        kw = {k: v for k, v in kw.items() if k != "norm"}  # PiT's norm is its class token's
    x = image(model)
    with torch.no_grad():
        theirs = tm.forward_intermediates(x, intermediates_only=True, **kw)
        ours = model.forward_intermediates(x, intermediates_only=True, **kw)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        close(a, b)


def test_final_features_and_prefix_tokens(models):
    name, tm, model = models
    if name.startswith("pit"):
        pytest.skip("timm's PiT returns its class tokens as final features")
    x = image(model)
    with torch.no_grad():
        final_t, inter_t = tm.forward_intermediates(x, indices=1, return_prefix_tokens=True)
        final_v, inter_v = model.forward_intermediates(x, indices=1, return_prefix_tokens=True)
    close(final_v, final_t)
    close(inter_v[0][0], inter_t[0][0])
    close(inter_v[0][1], inter_t[0][1])


def lr_scales(model, group_of):
    """{group of the parameter (stem, block i, head): LR scale} of AdamW with layer decay 0.75."""
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            key = group_of(names[id(p)])
            assert out.setdefault(key, group["lr_scale"]) == pytest.approx(group["lr_scale"]), key
    return out


def test_layer_decay_scales_equal_timms(models):
    name, tm, model = models
    if name.startswith("pit"):
        pytest.skip("timm's PiT has no group_matcher (it groups parameters by count)")

    def group_of(n: str) -> str:
        if n.startswith("blocks."):
            return ".".join(n.split(".")[:2])
        if n.startswith(("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed", "norm_pre")):
            return "stem"
        return "norm" if n.startswith("norm.") else "head"

    assert lr_scales(model, group_of) == lr_scales(tm, group_of)


def test_no_weight_decay_names_model_parameters(models):
    _, _, model = models
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert any(n.startswith("pos_embed.") for n in nwd) or not any(n.startswith("pos_embed.") for n in names)
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not any(id(names[n]) in decayed for n in nwd if n in names)


def test_data_config_from_spec_and_timms_cfg():
    model = vitlab.build_model(spec_from_timm("vit_tiny_patch16_224", img_size=64, depth=1))
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 64, 64)
    theirs = timm.data.resolve_data_config(model=timm.create_model("vit_tiny_patch16_224", depth=1, pretrained=False))
    for key in ("mean", "std", "crop_pct", "interpolation"):
        assert cfg[key] == theirs[key]
    own = vitlab.build_model("vit_tiny_rmsnorm_qknorm", device="meta")
    assert own.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_feature_info_and_sizes(models):
    name, tm, model = models
    assert model.num_features == tm.num_features
    assert model.num_prefix_tokens == getattr(tm, "num_prefix_tokens", 1)
    ours = [(f["num_chs"], f["reduction"]) for f in model.feature_info]
    theirs = [(f["num_chs"], f["reduction"]) for f in tm.feature_info]
    assert ours == theirs


def test_reset_classifier(models):
    name, tm, model = models
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.spec.num_classes == 7
    x = image(model)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert model.get_classifier() is model.head


def test_reset_classifier_changes_the_pool():
    tm, model = pair("vit_tiny_patch16_224")
    model.reset_classifier(5, "avg")
    tm.reset_classifier(5, "avg")
    assert model.spec.pool.name == "avg" and model.global_pool == "avg"
    x = image(model)
    with torch.no_grad():
        close(model.forward_head(model.forward_features(x), pre_logits=True),
              tm.forward_head(tm.forward_features(x), pre_logits=True))


def test_set_input_size_resamples_like_timm():
    tm, model = pair("vit_tiny_patch16_224")
    tm.set_input_size(img_size=(96, 80))
    model.set_input_size(img_size=(96, 80))
    assert model.spec.img_hw == (96, 80)
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close(model(x), tm(x))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "pit_ti_224"])
def test_prune_intermediate_layers(name):
    tm, model = pair(name)
    x = image(model)
    assert model.prune_intermediate_layers([0, 1]) == tm.prune_intermediate_layers([0, 1])
    with torch.no_grad():
        for a, b in zip(model.forward_intermediates(x, intermediates_only=True, indices=[0, 1]),
                        tm.forward_intermediates(x, intermediates_only=True, indices=[0, 1])):
            close(a, b)
    assert len(model.blocks) == model.spec.depth
