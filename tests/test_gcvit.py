"""GCViT's pieces in the architecture space: ``gcvit`` attention (local and global queries) against
a loop over windows written out by hand, the global query tokens a ``gcvit`` block makes and the
model's last block drops, the attention maps on the full grid, and the refusals.

References: softmax attention per window written out with explicit loops; timm's own
``FeatureBlock`` and ``Downsample2d`` for the global query generator and the downsampler."""
from __future__ import annotations

import functools

import pytest
import torch

from vitlab import SpecError, build_model, load_spec
from vitlab.state import ForwardState

gcvit = pytest.importorskip("timm.models.gcvit")


def _spec(**changes):
    return load_spec({
        "img_size": 32, "patch_size": 4, "class_token": False, "pos_embed": "none", "num_classes": 0,
        "norm": {"name": "layernorm", "params": {"eps": 1e-5}}, "pool": "adaptive_avg", "patch_embed": "gcvit_stem",
        "attention": {"name": "gcvit", "params": {"window_size": 4}}, "transition": "gcvit_down",
        "block": {"name": "gcvit", "params": {"global_size": 0}},
        "stages": [{"depth": 2, "embed_dim": 16, "num_heads": 2}, {"depth": 2, "embed_dim": 32, "num_heads": 2}],
        "layers": [{"at": "0,2", "block": {"name": "gcvit", "params": {"global_size": 4}}},
                   {"at": "1,3", "attention": {"name": "gcvit", "params": {"window_size": 4, "global_query": True}}}],
        **changes})


def _by_hand(attn, x, grid, P, global_query):
    """Each window's softmax(q kᵀ / sqrt(hd) + table bias) v with loops, q from the last w² prefix
    tokens when ``global_query``; (B, N, D) after the output projection."""
    B, _, D = x.shape
    H, w, (gh, gw) = attn.num_heads, attn.window, grid
    hd, n = D // H, w * w
    img = x[:, P:].reshape(B, gh, gw, D)
    table = attn.rel_pos.relative_position_bias_table
    out = torch.zeros(B, gh, gw, D)
    for r in range(0, gh, w):
        for c in range(0, gw, w):
            win = img[:, r:r + w, c:c + w].reshape(B, n, D)
            proj = attn.qkv(win).reshape(B, n, -1, H, hd)
            k, v = proj[:, :, -2], proj[:, :, -1]  # (B, n, H, hd)
            q = x[:, P - n:P].reshape(B, n, H, hd) if global_query else proj[:, :, 0]
            for h in range(H):
                logits = q[:, :, h] @ k[:, :, h].transpose(1, 2) * hd ** -0.5  # (B, n, n)
                for i in range(n):
                    for j in range(n):
                        dy, dx = i // w - j // w, i % w - j % w
                        logits[:, i, j] += table[(dy + w - 1) * (2 * w - 1) + dx + w - 1, h]
                o = logits.softmax(-1) @ v[:, :, h]  # (B, n, hd)
                out[:, r:r + w, c:c + w, h * hd:(h + 1) * hd] = o.reshape(B, w, w, hd)
    return attn.proj(out.reshape(B, gh * gw, D))


@pytest.mark.parametrize("global_query", [False, True])
def test_attention_equals_windows_by_hand(global_query):
    model = build_model(_spec(), seed=0).eval()
    attn = model.blocks[1 if global_query else 0].attn
    with torch.no_grad():
        attn.rel_pos.relative_position_bias_table.normal_()  # a bias that shows
        P = 16 if global_query else 0
        x = torch.randn(2, P + 64, 16)
        state = ForwardState.start((8, 8), 0).regrid((8, 8), num_prefix=P)
        out = attn(x, state)
        torch.testing.assert_close(out[:, P:], _by_hand(attn, x, (8, 8), P, global_query), atol=1e-5, rtol=1e-5)
    assert (out[:, :P] == 0).all()  # nothing added to the prefix tokens


def test_global_tokens_are_timms_feature_block_and_the_last_block_drops_them():
    model = build_model(_spec(), seed=0).eval()
    block = model.blocks[0]
    ref = gcvit.FeatureBlock(16, levels=1).eval()  # 8x8 -> 4x4: one MBConv and max pool
    ref.load_state_dict(block.global_block.state_dict(), strict=True)
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        out, state = block(x, ForwardState.start((8, 8), 0).replace(block_index=0))
        want = ref(x.transpose(1, 2).reshape(2, 16, 8, 8)).flatten(2).transpose(1, 2)  # (B, 16, D)
        torch.testing.assert_close(out[:, :16], want)
        assert state.num_prefix == 16 and out.shape == (2, 16 + 64, 16)
        tokens, end = model.forward_tokens(torch.randn(2, 3, 32, 32))
    assert end.num_prefix == 0 and tokens.shape == (2, 16, 32)  # the final norm sees the 4x4 patches only


def test_downsampler_is_timms():
    model = build_model(_spec(), seed=0).eval()
    ref = gcvit.Downsample2d(16, 32, norm_layer=functools.partial(gcvit.LayerNorm2d, eps=1e-5)).eval()
    ref.load_state_dict(model.transitions["1"].down.state_dict(), strict=True)
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        out, state = model.transitions["1"](x, ForwardState.start((8, 8), 0).replace(stage_index=1))
        want = ref(x.transpose(1, 2).reshape(2, 16, 8, 8)).flatten(2).transpose(1, 2)
    assert state.grid == (4, 4)
    torch.testing.assert_close(out, want)


def test_maps_are_windows_on_the_full_grid():
    model = build_model(_spec(), seed=0).eval()
    attn = model.blocks[0].attn
    attn.record_maps = True
    with torch.no_grad():
        attn(torch.randn(1, 64, 16), ForwardState.start((8, 8), 0))
    m = attn.attn_map  # (1, heads, 64, 64)
    assert m.shape == (1, 2, 64, 64)
    torch.testing.assert_close(m.sum(-1), torch.ones(1, 2, 64))
    assert m[0, 0, 0, 4] == 0 and m[0, 0, 0, 9] > 0  # patch 0 sees its own window (rows 0-3, cols 0-3) only


def test_refusals():
    with pytest.raises(SpecError, match="does not divide"):
        _spec(attention={"name": "gcvit", "params": {"window_size": 3}}, layers=[])
    with pytest.raises(SpecError, match="pools to"):
        _spec(layers=[{"at": "0", "block": {"name": "gcvit", "params": {"global_size": 3}}}])
    model = build_model(_spec(layers=[{"at": "1", "attention": {"name": "gcvit", "params": {"global_query": True, "window_size": 4}}}]),
                        device="meta")
    with pytest.raises(SpecError, match="needs 16 global query tokens"):
        model(torch.empty(1, 3, 32, 32, device="meta"))
