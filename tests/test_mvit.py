"""MViTv2's components against hand computations: ``pooling`` attention (plain attention when
nothing is pooled, the decomposed relative position term by term), the ``pooling_block``
transition (its grid, prefix tokens, max-pooled residual, the held block of ``widen: mlp``) and the
``conv_padded`` stem."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab import SpecError, build_model, load_spec
from vitlab.components.mvit import PoolingBlock
from vitlab.state import ForwardState

# 32 px, 7x7 stride 4 padding 3 -> an 8x8 grid, then 4x4 after the pooling block
STAGED = {
    "name": "mvit_small", "img_size": 32, "patch_size": 7, "num_classes": 10, "class_token": True, "reg_tokens": 1,
    "patch_embed": {"name": "conv_padded", "params": {"stride": 4, "padding": 3}}, "pos_embed": "none",
    "attention": {"name": "pooling", "params": {"stride_kv": 2}}, "pool": "token", "transition": "pooling_block",
    "norm": {"name": "layernorm", "params": {"eps": 1e-6}},
    "stages": [{"depth": 1, "embed_dim": 16, "num_heads": 1}, {"depth": 1, "embed_dim": 32, "num_heads": 2}],
}


def _model(**changes):
    return build_model(load_spec({**STAGED, **changes}), seed=0).eval()


def test_nothing_pooled_is_plain_attention():
    model = _model(attention={"name": "pooling", "params": {"kernel": 1, "rel_pos": False, "residual_pooling": False}})
    attn = model.blocks[0].attn
    assert attn.pool_q is attn.pool_k is attn.norm_q is attn.rel_pos_h is None
    x = torch.randn(2, 2 + 64, 16)
    state = ForwardState.start((8, 8), 2)
    with torch.no_grad():
        q, k, v = attn.qkv(x).chunk(3, dim=-1)  # one head of 16
        want = attn.proj(torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v)
        torch.testing.assert_close(attn(x, state), want, atol=1e-5, rtol=1e-5)


def test_relative_position_term_by_term():
    attn = _model().transitions["1"].attn  # queries 8x8 -> 4x4, keys 8x8 -> 4x4 (stride_kv 1 here: 8x8)
    torch.nn.init.normal_(attn.rel_pos_h)
    torch.nn.init.normal_(attn.rel_pos_w)
    P, (qh, qw), (kh, kw) = 2, (4, 4), (8, 8)
    q = torch.randn(1, 2, P + qh * qw, 16)
    with torch.no_grad():
        bias = attn._rel_pos_bias(q, (qh, qw), (kh, kw), P)
    assert bias.shape == (1, 2, P + qh * qw, P + kh * kw)
    assert not bias[:, :, :P].any() and not bias[:, :, :, :P].any()  # prefix tokens get none
    # the coarser query grid is scaled up to the keys': distance i * 2 - a, offset by kh - 1
    for i, j, a, b in [(0, 0, 0, 0), (3, 1, 0, 7), (2, 3, 5, 2)]:
        r = q[0, 1, P + i * qw + j]
        want = r @ attn.rel_pos_h[2 * i - a + kh - 1] + r @ attn.rel_pos_w[2 * j - b + kw - 1]
        torch.testing.assert_close(bias[0, 1, P + i * qw + j, P + a * kw + b], want.detach(), atol=1e-5, rtol=1e-5)


def test_pooling_block_pools_the_grid_and_keeps_the_prefix():
    model = _model()
    assert model.stage_grids == [(8, 8), (4, 4)]
    t = model.transitions["1"]
    x = torch.randn(2, 2 + 64, 16)
    state = ForwardState.start((8, 8), 2)
    with torch.no_grad():
        out, new = t(x, state)
        assert out.shape == (2, 2 + 16, 32) and new.grid == (4, 4) and new.num_prefix == 2
        # the residual: the normed tokens projected, the grid max-pooled (kernel 3, stride 2, padding 1)
        short = t.shortcut_proj_attn(t.norm1(x))
        img = short[:, 2:].transpose(1, 2).reshape(2, 32, 8, 8)
        pooled = F.max_pool2d(img, 3, 2, 1).flatten(2).transpose(1, 2)
        mid = torch.cat([short[:, :2], pooled], dim=1) + t.attn(t.norm1(x), state)
        torch.testing.assert_close(out, mid + t.mlp(t.norm2(mid)), atol=1e-5, rtol=1e-5)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


WIDEN = {"name": "pooling_block", "params": {"widen": "mlp", "in_heads": 1, "in_attention": {"stride_kv": 4},
                                             "attention": {"stride_kv": 2}}}


def test_widen_mlp_holds_the_previous_stages_last_block():
    model = _model(stages=[STAGED["stages"][0], {**STAGED["stages"][1], "transition": WIDEN}])
    t = model.transitions["1"]
    held = t.widen
    # the held block: the previous stage's width, grid and heads, its own key / value stride, an MLP 16 -> 64 -> 32
    assert held.attn.num_heads == 1 and held.attn.pool_k.stride == (4, 4) and t.attn.pool_k.stride == (2, 2)
    assert (held.mlp.fc1.in_features, held.mlp.fc1.out_features, held.mlp.fc2.out_features) == (16, 64, 32)
    assert t.shortcut_proj_attn is None and t.attn.qkv.in_features == 32  # the pooling block keeps the width
    x = torch.randn(2, 2 + 64, 16)
    state = ForwardState.start((8, 8), 2)
    with torch.no_grad():
        mid = x + held.attn(held.norm1(x), state)
        widened = held.shortcut_proj_mlp(held.norm2(mid)) + held.mlp(held.norm2(mid))  # (2, 66, 32)
        torch.testing.assert_close(held(x, state), widened)
        out, new = t(x, state)
        assert out.shape == (2, 2 + 16, 32) and new.grid == (4, 4)
    with pytest.raises(SpecError, match="in_heads dividing"):
        load_spec({**STAGED, "stages": [STAGED["stages"][0], {**STAGED["stages"][1], "transition": {
            "name": "pooling_block", "params": {"widen": "mlp", "in_heads": 3}}}]})
    with pytest.raises(SpecError, match="widen 'mlp' only"):
        load_spec({**STAGED, "stages": [STAGED["stages"][0], {**STAGED["stages"][1], "transition": {
            "name": "pooling_block", "params": {"in_heads": 1}}}]})


def test_padded_conv_stem():
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    conv = model.patch_embed.proj
    want = F.conv2d(x, conv.weight, conv.bias, stride=4, padding=3).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.patch_embed(x), want)
    assert load_spec({**STAGED, "img_size": 224}).build_context().grid_size == (56, 56)


def test_what_does_not_fit_is_refused():
    # the residual's max pool (kernel 4, stride 3) and the queries' (kernel 5) disagree on a 6x6 grid
    with pytest.raises(SpecError, match="different grids"):
        load_spec({**STAGED, "img_size": 24, "stages": [
            STAGED["stages"][0], {**STAGED["stages"][1], "transition": {
                "name": "pooling_block", "params": {"stride_q": 3, "attention": {"kernel": 5}}}}]})
    assert PoolingBlock.out_grid((7, 7), PoolingBlock.Params()) == (4, 4)
    with pytest.raises(SpecError, match="pooling has no place for the transform of queries and keys pos_embed "
                                        "'rope' gives"):  # refused when it validates, not at the first forward
        _model(pos_embed="rope")
