"""vitlab-efficient-attention: attention 'linear' as an installed plugin."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import attention_maps
from vitlab.state import ForwardState
from vitlab_efficient_attention import LinearAttention

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
    assert reg.get("attention", "linear").provider == "vitlab-efficient-attention"
    assert reg.get("attention", "window").provider == "vitlab"  # window attention is a built-in since 0.2


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
        torch.testing.assert_close(attn(x, ForwardState.start((4, 4), 2)), expected, atol=1e-5, rtol=1e-4)


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
        torch.testing.assert_close(attn(x, ForwardState(None, 0, 17, qk_transform=transform)), _proj(attn, num / (den + attn.eps)), atol=1e-5, rtol=1e-4)


def test_linear_has_no_maps():
    model = _model("linear")
    assert not LinearAttention.has_maps
    with pytest.raises(vitlab.VitlabError, match="'linear' computes no attention matrix"):
        attention_maps(model, torch.randn(1, 3, 32, 32))


# --- FLOPs --------------------------------------------------------------------------------------------

def _flops(attention, img: int, **changes) -> int:
    spec = {**TINY, "img_size": img, "class_token": False, "pool": "avg", "num_classes": 0, "depth": 1,
            "attention": attention, **changes}
    report = vitlab.analyze(spec, second_opinion=False)
    assert not report.unsupported, report.unsupported
    return report.by_kind["attention"]


def test_flops_grow_linearly_with_tokens():
    """Without prefix tokens every term of linear attention is proportional to N: 4x the tokens
    costs exactly 4x; softmax attention costs more than that."""
    n1, n2 = 16, 64  # 32 px and 64 px images, 8 px patches
    assert _flops("linear", 64) * n1 == _flops("linear", 32) * n2
    assert _flops("mhsa", 64) * n1 > _flops("mhsa", 32) * n2
    # linear: qkv + proj (4·N·D²) plus phi(K)ᵀ[V, 1] and phi(Q)·that, 2·N·hd·(hd + 1) per head
    D, h, hd = 32, 2, 16
    assert _flops("linear", 32) == 4 * n1 * D * D + h * 2 * n1 * hd * (hd + 1)


def test_recipes_build_and_run():
    for name, attention in (("vit_tiny_linear_attn", "linear"),):
        spec = vitlab.load_spec(RECIPES / f"{name}.yaml", overrides={"depth": 1})
        assert spec.attention.name == attention
        with torch.no_grad():
            assert vitlab.build_model(spec, seed=0).eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_timm_round_trip_through_the_declared_equivalent():
    """The plugin's ``vitlab_timm_equivalents`` declaration: timm_kwargs builds timm's own
    VisionTransformer with ``TimmLinearAttention`` in every block, its outputs equal vitlab's after
    to_timm_state_dict, and spec_from_timm reads that timm model back to the same spec. The
    reference is timm's model running the twin module, an independent implementation."""
    pytest.importorskip("timm")
    from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict
    from vitlab_efficient_attention import TimmLinearAttention

    spec = vitlab.load_spec({**TINY, "attention": {"name": "linear", "params": {"eps": 1e-5, "qk_norm": True}}})
    model = vitlab.build_model(spec, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tm = timm_class(spec)(**timm_kwargs(spec)).eval()
    assert all(isinstance(b.attn, TimmLinearAttention) and b.attn.eps == 1e-5 for b in tm.blocks)
    tm.load_state_dict(to_timm_state_dict(model), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), tm(x)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    back = spec_from_timm(tm)
    assert back.model_dump(exclude={"name"}) == spec.model_dump(exclude={"name"})
    again = vitlab.build_model(back)
    assert load_timm_weights(again, tm).ok
    with torch.no_grad():
        assert torch.equal(again.eval()(x), ours)


def test_equivalent_for_a_component_it_does_not_register_fails_the_plugin():
    class Twin(torch.nn.Module):
        pass

    class Bad:
        @vitlab.hookimpl
        def vitlab_timm_equivalents(register):
            register(vitlab.TimmEquivalent(kind="attention", name="mhsa", timm_type=Twin, read=dict,
                                           layer=lambda p: None))

    _, registry = vitlab.make_plugin_manager(entry_points=False, plugins=[("bad", Bad)], strict=False)
    (failure,) = registry.failures
    assert "does not register" in failure.message() and ("attention", "mhsa") not in registry.timm_equivalents


def test_equivalent_claiming_a_timm_class_fails_the_plugin():
    """A twin must be the plugin's own class: claiming timm's Attention would take over every ViT."""
    from timm.layers import Attention

    class Greedy:
        @vitlab.hookimpl
        def vitlab_register_components(register):
            register(type("Mine", (LinearAttention,), {"name": "mine"}))

        @vitlab.hookimpl
        def vitlab_timm_equivalents(register):
            register(vitlab.TimmEquivalent(kind="attention", name="mine", timm_type=Attention, read=dict,
                                           layer=lambda p: Attention))

    _, registry = vitlab.make_plugin_manager(entry_points=False, plugins=[("greedy", Greedy)], strict=False)
    (failure,) = registry.failures
    assert "the plugin's own class" in failure.message() and ("attention", "mine") not in registry
