"""LeViT's pieces in the architecture space: the ``residual`` block of ``levit`` attention and
``bn_mlp``, the ``levit_subsample`` transition, the offset-bias index, the ``avg_bn`` head and the
rules they check.

References: timm's own ``LevitBlock`` and ``LevitDownsample`` (linear and 1x1-conv forms) with the
same weights and BatchNorm statistics, in eval mode, and indices written out by hand.
"""
from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab import build_model, load_spec
from vitlab.components.levit import bias_index
from vitlab.maps import record_attention
from vitlab.state import ForwardState

from timm_reference import randomize, randomize_stats

levit = pytest.importorskip("timm.models.levit")

D, HEADS, KD = 16, 2, 8


def _model(conv: bool = False, **changes):
    """Two stages on a 4x4 then 2x2 grid (64 px, 16 px stem): widths 16 -> 32."""
    spec = {"img_size": 64, "patch_size": 16, "num_classes": 10, "class_token": False, "final_norm": False,
            "patch_embed": "levit_stem", "pos_embed": "none", "block": "residual", "pool": "avg_bn", "mlp_ratio": 2.0,
            "attention": {"name": "levit", "params": {"key_dim": KD, "conv": conv}},
            "mlp": {"name": "bn_mlp", "params": {"conv": conv}},
            "transition": {"name": "levit_subsample", "params": {"key_dim": KD, "conv": conv}},
            "stages": [{"depth": 1, "embed_dim": D, "num_heads": HEADS}, {"depth": 1, "embed_dim": 2 * D, "num_heads": 4}],
            **changes}
    return randomize_stats(randomize(build_model(load_spec(spec), seed=0))).eval()


@pytest.mark.parametrize("conv", [False, True])
def test_block_equals_timm_levit_block(conv):
    """``residual`` with ``levit`` and ``bn_mlp`` is timm's ``LevitBlock``: BN-linear qkv split per
    head into key_dim, key_dim, 2 key_dim, the offset biases, hard swish before the projection."""
    block = _model(conv).blocks[0]
    ref = levit.LevitBlock(D, KD, num_heads=HEADS, attn_ratio=2.0, mlp_ratio=2.0, resolution=4, use_conv=conv,
                           act_layer=torch.nn.Hardswish).eval()
    ref.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, 16, D)
    with torch.no_grad():
        want = ref(x.transpose(1, 2).reshape(2, D, 4, 4)).flatten(2).transpose(1, 2) if conv else ref(x)
        torch.testing.assert_close(block(x, ForwardState.start((4, 4), 0)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [False, True])
def test_subsample_equals_timm_levit_downsample(conv):
    """``levit_subsample`` is timm's ``LevitDownsample``: queries from every other patch of the 4x4
    grid, keys and values from all 16, to width 32 on a 2x2 grid, then the residual MLP."""
    down = _model(conv).transitions["1"]
    ref = levit.LevitDownsample(D, 2 * D, key_dim=KD, num_heads=D // KD, attn_ratio=4.0, mlp_ratio=2.0,
                                act_layer=torch.nn.Hardswish, resolution=4, use_conv=conv).eval()
    ref.load_state_dict(down.state_dict(), strict=True)
    x = torch.randn(2, 16, D)
    with torch.no_grad():
        out, state = down(x, ForwardState.start((4, 4), 0))
        want = ref(x.transpose(1, 2).reshape(2, D, 4, 4)).flatten(2).transpose(1, 2) if conv else ref(x)
    assert state.grid == (2, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_subsample_switches_show():
    """``act`` and ``conv`` of ``levit_subsample`` (inert in test_components' flat model) act here."""
    base = _model()
    x, state = torch.randn(2, 16, D), ForwardState.start((4, 4), 0)
    silu = _model(transition={"name": "levit_subsample", "params": {"key_dim": KD, "act": "silu"}})
    silu.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert not torch.allclose(silu.transitions["1"](x, state)[0], base.transitions["1"](x, state)[0], atol=1e-4)
    conv = _model(transition={"name": "levit_subsample", "params": {"key_dim": KD, "conv": True}})
    assert conv.state_dict()["transitions.1.attn_downsample.kv.linear.weight"].shape == (80, D, 1, 1)


def test_bias_index_by_hand():
    """A 2x3 grid: |dy| * 3 + |dx|; queries every 2nd patch are (0, 0) and (0, 2)."""
    idx = bias_index((2, 3))
    assert idx[0].tolist() == [0, 1, 2, 3, 4, 5]  # patch (0, 0) to every patch
    assert idx[5].tolist() == [5, 4, 3, 2, 1, 0]  # patch (1, 2)
    assert bias_index((2, 3), stride=2).tolist() == [[0, 1, 2, 3, 4, 5], [2, 1, 0, 5, 4, 3]]


def test_biases_act_and_maps_sit_on_the_grid():
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    attn, tokens, state = model.blocks[0].attn, torch.randn(1, 16, D), ForwardState.start((4, 4), 0)
    with torch.no_grad():
        before = attn(tokens, state)
        attn.attention_biases.add_(torch.arange(16.0))  # a bias growing with the offset
        assert not torch.allclose(attn(tokens, state), before, atol=1e-3)
        attn.attention_biases.sub_(torch.arange(16.0))
        fused = model(x)
    records = record_attention(model, x)
    assert [r.map.shape for r in records] == [(1, HEADS, 16, 16), (1, 4, 4, 4)]
    torch.testing.assert_close(records[0].map.sum(-1), torch.ones(1, HEADS, 16))
    with torch.no_grad():
        attn.record_maps = True
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)  # explicit path == fused


def test_distilled_head_averages_two_classifiers():
    model = _model(pool={"name": "avg_bn", "params": {"distilled": True}})
    head, feats = model.head, torch.randn(3, 2 * D)
    with torch.no_grad():
        want = (head.linear(head.bn(feats)) + head.dist.linear(head.dist.bn(feats))) / 2
        torch.testing.assert_close(head(feats), want)
    assert isinstance(_model(num_classes=0).head, torch.nn.Identity)
    model.train()
    assert model.head(feats[:1]).shape == (1, 10)  # one sample trains on the running statistics


@pytest.mark.parametrize("changes, message", [
    ({"class_token": True, "pool": "avg"}, "no class or register tokens"),  # the transition's rule
    ({"dynamic_img_size": True}, "no dynamic_img_size"),
    ({"attention": {"name": "levit", "params": {"key_dim": 1, "attn_ratio": 0.5}}}, "attn_ratio \\* key_dim >= 1"),
    ({"transition": {"name": "levit_subsample", "params": {"key_dim": 32}}}, "below key_dim 32"),
])
def test_rules_are_checked(changes, message):
    with pytest.raises(vitlab.SpecError, match=message):
        _model(**changes)
