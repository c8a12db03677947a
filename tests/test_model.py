"""The assembled model: allocation (meta, dtype), seeding, timm parameter names, outputs of the
pooling choices, dynamic image sizes, attention-map recording, gradient checkpointing."""
from __future__ import annotations

import pytest
import torch

from vitlab import build_model, load_spec

from conftest import TINY, TINY_PATCHES

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(b=2, h=32, w=32, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_meta_build_allocates_nothing():
    model = build_model(load_spec(TINY, overrides={"pos_embed.name": "sincos2d"}), device="meta")
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    out = model(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.is_meta and out.shape == (2, 10)


def test_dtype_bfloat16():
    model = build_model(load_spec(TINY, overrides={"pos_embed.name": "sincos2d"}), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in model.buffers()} == {torch.bfloat16}
    with torch.no_grad():
        out = model.eval()(_images().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10) and torch.isfinite(out).all()


def test_seed_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(1234)
    expected_next = torch.rand(5)  # what the global generator gives next without any build
    torch.manual_seed(1234)
    a = build_model(TINY, seed=0)
    b = build_model(TINY, seed=0)
    assert torch.equal(torch.rand(5), expected_next)  # the builds did not consume global randomness
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = build_model(TINY, seed=1)
    assert not torch.equal(c.state_dict()["blocks.0.attn.qkv.weight"], sa["blocks.0.attn.qkv.weight"])


TIMM_NAMES = [
    "patch_embed.proj.weight", "cls_token", "reg_token", "norm_pre.weight", "blocks.0.norm1.weight",
    "blocks.0.attn.qkv.weight", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight",
    "blocks.0.attn.proj.weight", "blocks.0.ls1.gamma", "blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight",
    "blocks.0.mlp.fc2.weight", "blocks.0.ls2.gamma", "blocks.1.mlp.fc2.bias", "norm.weight", "head.weight",
]


def test_parameter_names_follow_timm():
    spec = load_spec({
        **TINY, "reg_tokens": 2, "pre_norm": True,
        "patch_embed": {"name": "conv", "params": {"bias": False}},  # timm drops it with pre_norm
        "attention": {"name": "mhsa", "params": {"qk_norm": True}},
        "block": {"name": "prenorm", "params": {"init_values": 1e-5}},
    })
    ours = {k: tuple(v.shape) for k, v in build_model(spec, device="meta").named_parameters()}
    assert set(TIMM_NAMES) <= set(ours)
    # and exactly timm's names and shapes for the same configuration (pos_embed aside)
    vt = pytest.importorskip("timm.models.vision_transformer")
    with torch.device("meta"):
        ref = vt.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, reg_tokens=2,
            pre_norm=True, qk_norm=True, init_values=1e-5,
        )
    theirs = {k: tuple(v.shape) for k, v in ref.named_parameters()}
    ours["pos_embed"] = ours.pop("pos_embed.weight")
    assert ours == theirs


def test_optional_names_absent_by_default():
    names = {k for k, _ in build_model(TINY, device="meta").named_parameters()}
    for absent in ("reg_token", "norm_pre.weight", "blocks.0.attn.q_norm.weight", "blocks.0.ls1.gamma"):
        assert absent not in names
    names = {k for k, _ in build_model({**TINY, "class_token": False, "pool": "avg"}, device="meta").named_parameters()}
    assert "cls_token" not in names


@pytest.mark.parametrize(
    "fields, shape",
    [
        ({}, (2, 10)),
        ({"num_classes": 0}, (2, 32)),  # pooled features
        ({"pool": "none"}, (2, 1 + TINY_PATCHES, 10)),  # the head on every token
        ({"pool": "none", "num_classes": 0}, (2, 1 + TINY_PATCHES, 32)),
        ({"pool": "avg", "class_token": False, "num_classes": 0}, (2, 32)),
    ],
)
def test_output_shapes(fields, shape):
    model = build_model({**TINY, **fields}, seed=0).eval()
    with torch.no_grad():
        assert model(_images()).shape == shape


def test_num_classes_zero_is_pre_logits():
    model = build_model(TINY, seed=0).eval()
    x = _images()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.head(feats), model(x))
        tokens = model.forward_features(x)
    torch.testing.assert_close(feats, tokens[:, 0])  # token pool: the class token
    headless = build_model({**TINY, "num_classes": 0}, seed=0).eval()
    assert isinstance(headless.head, torch.nn.Identity)


@pytest.mark.parametrize("cls, regs", [(True, 0), (True, 4), (False, 0), (False, 3)])
def test_forward_features_shape(cls, regs):
    model = build_model({**TINY, "class_token": cls, "reg_tokens": regs, "pool": "avg"}, seed=0).eval()
    with torch.no_grad():
        assert model.forward_features(_images()).shape == (2, int(cls) + regs + TINY_PATCHES, 32)


def test_avg_pool_excludes_prefix_tokens():
    model = build_model({**TINY, "reg_tokens": 2, "pool": "avg", "num_classes": 0}, seed=0).eval()
    with torch.no_grad():
        tokens = model.forward_features(_images())
        torch.testing.assert_close(model(_images()), tokens[:, 3:].mean(1))


@pytest.mark.parametrize("pos", ["learned", "sincos2d", "none"])
def test_dynamic_img_size(pos):
    model = build_model({**TINY, "dynamic_img_size": True, "reg_tokens": 1, "pos_embed": pos}, seed=0).eval()
    with torch.no_grad():
        assert model(_images(h=48, w=40)).shape == (2, 10)
        assert model.forward_features(_images(h=48, w=40)).shape == (2, 2 + 6 * 5, 32)
        # at the native size a dynamic model is the plain model
        plain = build_model({**TINY, "reg_tokens": 1, "pos_embed": pos}, seed=0).eval()
        torch.testing.assert_close(model(_images()), plain(_images()))


def test_learned_positions_resample_like_timm():
    layers = pytest.importorskip("timm.layers")
    model = build_model({**TINY, "dynamic_img_size": True}, seed=0)
    table = model.pos_embed.weight.detach()
    ours = model.pos_embed.table((6, 5))
    ref = layers.resample_abs_pos_embed(table, new_size=(6, 5), old_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_fixed_size_model_refuses_other_sizes():
    model = build_model(TINY, seed=0)
    with pytest.raises(ValueError, match=r"48x40.*32x32.*dynamic_img_size"):
        model(_images(h=48, w=40))


def test_attention_recording_same_output_and_maps():
    model = build_model({**TINY, "reg_tokens": 1}, seed=0).eval()
    x = _images()
    with torch.no_grad():
        ref = model(x)
    seen = {}

    def keep_input(module, args, output):
        seen["in"] = args[0]

    model.blocks[0].attn.register_forward_hook(keep_input)
    for block in model.blocks:
        block.attn.record_maps = True
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    n = 2 + TINY_PATCHES
    for block in model.blocks:
        amap = block.attn.attn_map
        assert amap.shape == (2, 2, n, n)
        torch.testing.assert_close(amap.sum(-1), torch.ones(2, 2, n))
        assert (amap >= 0).all()
    # block 0's map recomputed by hand from its qkv weights
    attn = model.blocks[0].attn
    qkv = seen["in"] @ attn.qkv.weight.T + attn.qkv.bias  # (B, N, 3D)
    q, k, _ = qkv.reshape(2, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 16**0.5, dim=-1)
    torch.testing.assert_close(attn.attn_map, expected, atol=1e-5, rtol=0)


def test_grad_checkpointing_same_gradients():
    spec = load_spec(TINY)
    x = _images()

    def grads(checkpoint: bool):
        model = build_model(spec, seed=0).train()
        model.set_grad_checkpointing(checkpoint)
        calls = []
        mlp = model.blocks[0].mlp
        forward = mlp.forward
        mlp.forward = lambda h: (calls.append(1), forward(h))[1]  # counts runs, also recomputations
        model(x).square().mean().backward()
        return {k: p.grad for k, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # checkpointing really recomputed the block in backward
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


def test_drop_path_grows_linearly():
    model = build_model({**TINY, "depth": 5, "drop_path_rate": 0.2}, device="meta")
    rates = [getattr(b.drop_path1, "p", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    # stochastic in training, off in eval
    model = build_model({**TINY, "drop_path_rate": 0.5}, seed=0)
    x = _images(b=16)
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))
        torch.testing.assert_close(model.eval()(x), model(x))


def test_extra_repr_and_spec_kept():
    model = build_model(TINY)
    assert model.spec == load_spec(TINY)
    assert "tiny" in repr(model)
