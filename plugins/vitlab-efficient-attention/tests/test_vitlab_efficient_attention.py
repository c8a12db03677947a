"""vitlab-efficient-attention: attention 'linear' and 'window' as an installed plugin."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.attention_maps import attention_maps
from vitlab_efficient_attention import LinearAttention, WindowAttention

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "plugins"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


def _model(attention, **changes):
    return vitlab.build_model(vitlab.load_spec({**TINY, "attention": attention, **changes}), seed=0).eval()


def _qkv(attn, x):
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]


def _proj(attn, out):
    B, _, N, _ = out.shape
    return attn.proj(out.transpose(1, 2).reshape(B, N, -1))


def test_registered_by_the_installed_distribution():
    reg = vitlab.get_registry()
    assert reg.get("attention", "linear").cls is LinearAttention
    assert reg.get("attention", "window").cls is WindowAttention
    assert {reg.get("attention", n).provider for n in ("linear", "window")} == {"vitlab-efficient-attention"}
    assert reg.get("attention", "window").default_params()["window"] == 7


# --- linear -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [False, True])
def test_linear_equals_the_quadratic_formula(qk_norm):
    """out_i = Σ_j phi(q_i)·phi(k_j) v_j / Σ_j phi(q_i)·phi(k_j), here written with the N x N matrix."""
    model = _model({"name": "linear", "params": {"qk_norm": qk_norm}}, reg_tokens=1)
    attn = model.blocks[0].attn
    x = torch.randn(2, 18, 32)
    q, k, v = _qkv(attn, x)
    s = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)  # (B, h, N, N), positive
    expected = _proj(attn, (s / (s.sum(-1, keepdim=True) + attn.eps)) @ v)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)


def test_linear_with_a_position_transform_rotates_the_numerator_only():
    model = _model("linear")
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 32)
    angle = torch.linspace(0, 3, 17)[:, None]

    def transform(q, k):  # a stand-in rotation of the first pair per token
        def rot(t):
            a, b = t[..., :1], t[..., 1:2]
            return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos(), t[..., 2:]], -1)
        return rot(q), rot(k)

    q, k, v = _qkv(attn, x)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    rq, rk = transform(fq, fk)
    num = (rq @ rk.transpose(-2, -1)) @ v
    den = (fq @ fk.transpose(-2, -1)).sum(-1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, transform), _proj(attn, num / (den + attn.eps)), atol=1e-5, rtol=1e-4)


def test_linear_has_no_maps():
    model = _model("linear")
    assert not LinearAttention.has_maps
    with pytest.raises(vitlab.VitlabError, match="'linear' computes no attention matrix"):
        attention_maps(model, torch.randn(1, 3, 32, 32))


# --- window -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [{}, {"reg_tokens": 2}, {"class_token": False, "pool": "avg"}])
def test_window_fused_equals_masked_dense_and_maps_are_block_sparse(prefix):
    model = _model({"name": "window", "params": {"window": 2}}, **prefix)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
    maps = attention_maps(model, x)  # the explicit path: full (B, h, N, N) probabilities
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused)  # recording is off again
    attn = model.blocks[0].attn
    P = model.num_prefix_tokens
    allowed = attn.allowed()
    assert allowed.shape == (P + 16, P + 16)
    assert allowed[:P].all() and allowed[:, :P].all()
    assert allowed[P:, P:].sum() == 16 * 4  # each patch sees its own 2x2 window
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    win = (rows // 2) * 2 + cols // 2
    assert torch.equal(allowed[P:, P:], win[:, None] == win[None, :])
    for m in maps:
        assert m.shape == (2, 2, P + 16, P + 16)
        assert (m[..., ~allowed] == 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 2, P + 16))
    # and the recorded path's output equals the fused windowed path
    for block in model.blocks:
        block.attn.record_maps = True
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_window_covering_the_grid_is_global_attention():
    mhsa = _model("mhsa", reg_tokens=1)
    window = _model({"name": "window", "params": {"window": 4}}, reg_tokens=1)
    window.load_state_dict(mhsa.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(window(x), mhsa(x), atol=1e-5, rtol=1e-5)


def test_window_constraints():
    with pytest.raises(vitlab.SpecError, match=r"attention: window \(plugin 'vitlab-efficient-attention'\) needs a window that divides the 4x4 patch grid, got window 3 .* fit: 1, 2, 4"):
        vitlab.load_spec({**TINY, "attention": {"name": "window", "params": {"window": 3}}})
    with pytest.raises(vitlab.SpecError, match="does not support dynamic_img_size"):
        vitlab.load_spec({**TINY, "dynamic_img_size": True, "attention": {"name": "window", "params": {"window": 2}}})


# --- FLOPs --------------------------------------------------------------------------------------------

def _flops(attention, img: int, **changes) -> int:
    spec = {**TINY, "img_size": img, "class_token": False, "pool": "avg", "num_classes": 0, "depth": 1,
            "attention": attention, **changes}
    report = vitlab.analyze(spec, second_opinion=False)
    assert not report.unsupported, report.unsupported
    return report.by_kind["attention"]


def test_flops_grow_linearly_with_tokens():
    """Without prefix tokens every term of linear and window attention is proportional to N:
    4x the tokens costs exactly 4x; softmax attention costs more than that."""
    n1, n2 = 16, 64  # 32 px and 64 px images, 8 px patches
    for attention in ("linear", {"name": "window", "params": {"window": 2}}):
        assert _flops(attention, 64) * n1 == _flops(attention, 32) * n2
    assert _flops("mhsa", 64) * n1 > _flops("mhsa", 32) * n2
    # linear: qkv + proj (4·N·D²) plus phi(K)ᵀ[V, 1] and phi(Q)·that, 2·N·hd·(hd + 1) per head
    D, h, hd = 32, 2, 16
    assert _flops("linear", 32) == 4 * n1 * D * D + h * 2 * n1 * hd * (hd + 1)
    # window: each patch query meets window² keys (plus the prefix tokens when there are any)
    w = 2
    assert _flops({"name": "window", "params": {"window": w}}, 32) == 4 * n1 * D * D + h * 2 * n1 * w * w * hd
    P = 1
    with_cls = _flops({"name": "window", "params": {"window": w}}, 32, class_token=True, pool="token")
    T = n1 + P
    assert with_cls == 4 * T * D * D + h * 2 * hd * (n1 * (P + w * w) + P * T)


def test_recipes_build_and_run():
    for name, attention in (("vit_tiny_linear_attn", "linear"), ("vit_tiny_window7", "window")):
        spec = vitlab.load_spec(RECIPES / f"{name}.yaml", overrides={"depth": 1})
        assert spec.attention.name == attention
        with torch.no_grad():
            assert vitlab.build_model(spec, seed=0).eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
