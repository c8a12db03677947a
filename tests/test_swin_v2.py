"""Swin v2's pieces in the architecture space: the continuous position biases (``rel_pos: cpb`` and
``cpb_cr``) against the formulas written out for a 2x2 window, cosine attention, the res-post-norm
blocks and v2's patch merging against timm's own modules.

References: the papers' formulas by hand, and timm's ``SwinTransformerV2Block``,
``SwinTransformerV2CrBlock`` and v2's ``PatchMerging``.
"""
from __future__ import annotations

import math

import pytest
import torch

from vitlab import build_model, load_spec
from vitlab.components.swin_v2 import continuous_bias
from vitlab.state import ForwardState

v2 = pytest.importorskip("timm.models.swin_transformer_v2")
cr = pytest.importorskip("timm.models.swin_transformer_v2_cr")

D, HEADS = 32, 2


def _one_block(img: int, window: int, shift: int, block: str = "respostnorm", **attn):
    spec = {"img_size": img, "patch_size": 4, "embed_dim": D, "num_heads": HEADS, "depth": 1, "class_token": False,
            "pos_embed": "none", "pool": "avg", "num_classes": 0,
            "norm": {"name": "layernorm", "params": {"eps": 1e-5}},
            "block": block, "attention": {"name": "window", "params": {"window_size": window, "shift": shift, **attn}}}
    return build_model(load_spec(spec), seed=0).eval()


def _window_pairs(w: int):
    """(query, key) positions of a w x w window in row-major order: the index pairs and their (dy, dx)."""
    cells = [(y, x) for y in range(w) for x in range(w)]
    return [(i, j, qy - ky, qx - kx) for i, (qy, qx) in enumerate(cells) for j, (ky, kx) in enumerate(cells)]


@pytest.mark.parametrize("pretrained", [0, 3])
def test_cpb_bias_of_a_2x2_window_by_hand(pretrained):
    """v2: bias[h, i, j] = 16 sigmoid(W2 relu(W1 c + b1))[h], c = (f(dy), f(dx)) of query minus key,
    f(d) = sign(d) log2(1 + 8 |d| / (w' - 1)) / log2(8), w' the pretrained window or the window."""
    attn = _one_block(8, 2, 0, rel_pos="cpb", cosine=True, pretrained_window_size=pretrained).blocks[0].attn
    lin1, lin2 = attn.cpb_mlp[0], attn.cpb_mlp[2]
    span = (pretrained or 2) - 1

    def f(d):
        return math.copysign(math.log2(1 + 8 * abs(d) / span) / math.log2(8), d) if d else 0.0

    want = torch.empty(HEADS, 4, 4)
    with torch.no_grad():
        for i, j, dy, dx in _window_pairs(2):
            c = torch.tensor([f(dy), f(dx)])
            want[:, i, j] = 16 * torch.sigmoid(lin2.weight @ torch.relu(lin1.weight @ c + lin1.bias))
        torch.testing.assert_close(continuous_bias(attn, 2), want, atol=1e-6, rtol=1e-6)
    assert attn.relative_coords_table.shape == (1, 3, 3, 2)


def test_cpb_cr_bias_of_a_2x2_window_by_hand():
    """v2-cr: bias[h, i, j] = (W2 relu(W1 c + b1) + b2)[h], c = (g(dy), g(dx)), g(d) = sign(d) ln(1 + |d|)."""
    attn = _one_block(8, 2, 0, rel_pos="cpb_cr", cosine=True, cpb_hidden=384).blocks[0].attn
    fc1, fc2 = attn.meta_mlp.fc1, attn.meta_mlp.fc2

    def g(d):
        return math.copysign(math.log(1 + abs(d)), d) if d else 0.0

    want = torch.empty(HEADS, 4, 4)
    with torch.no_grad():
        for i, j, dy, dx in _window_pairs(2):
            c = torch.tensor([g(dy), g(dx)])
            want[:, i, j] = fc2.weight @ torch.relu(fc1.weight @ c + fc1.bias) + fc2.bias
        torch.testing.assert_close(continuous_bias(attn, 2), want, atol=1e-6, rtol=1e-6)
    assert attn.relative_coordinates_log.shape == (16, 2)  # one row per pair: what timm's MLP runs on


def test_cosine_attention_by_hand():
    """One window, no bias: softmax(min(exp(s), 100) cos(q_i, k_j)) v, s the logit scale per head
    (one above ln 100, to see the clamp)."""
    attn = _one_block(8, 2, 0, cosine=True).blocks[0].attn
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([1.5, 6.0]).reshape(2, 1, 1))
        x = torch.randn(1, 4, D)
        out = attn(x, ForwardState.start((2, 2), 0))
        q, k, v = attn.qkv(x).reshape(1, 4, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        cos = torch.nn.functional.cosine_similarity(q[:, :, :, None], k[:, :, None], dim=-1)  # (1, h, 4, 4)
        scale = torch.tensor([math.exp(1.5), 100.0]).reshape(1, 2, 1, 1)
        mixed = ((scale * cos).softmax(-1) @ v).transpose(1, 2).reshape(1, 4, D)
        torch.testing.assert_close(out, attn.proj(mixed), atol=1e-5, rtol=1e-5)


# img 32 / 4 = an 8x8 grid; 40 -> 10x10 (padded to 12x12); 24 -> 6x6 (one window of 6 would be the grid)
@pytest.mark.parametrize("img, window, shift, pretrained", [(32, 4, 2, 0), (40, 4, 2, 6), (24, 4, 0, 0)])
def test_blocks_equal_timm_v2_and_cr_blocks(img, window, shift, pretrained):
    """``respostnorm`` with window cpb + cosine + qv biases is timm's ``SwinTransformerV2Block``;
    ``respostnorm_norm3`` with cpb_cr is ``SwinTransformerV2CrBlock(extra_norm=True)``: same
    weights (timm's q / v biases inside vitlab's qkv, v2-cr's logit scale as (heads, 1, 1))."""
    g = img // 4
    x = torch.randn(2, g, g, D)
    refs = [
        (v2.SwinTransformerV2Block(dim=D, input_resolution=(g, g), num_heads=HEADS, window_size=window,
                                   shift_size=shift, pretrained_window_size=pretrained),
         _one_block(img, window, shift, rel_pos="cpb", cosine=True, qkv_bias="qv", pretrained_window_size=pretrained)),
        (cr.SwinTransformerV2CrBlock(dim=D, feat_size=(g, g), num_heads=HEADS, window_size=(window, window),
                                     shift_size=(shift, shift), extra_norm=True),
         _one_block(img, window, shift, "respostnorm_norm3", rel_pos="cpb_cr", cosine=True, cpb_hidden=384,
                    cpb_drop=0.125)),
    ]
    for ref, model in refs:
        ref.eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        sd = {k.replace("attn.q_bias", "attn.qkv.q_bias").replace("attn.v_bias", "attn.qkv.v_bias"):
              v.reshape(-1, 1, 1) if k == "attn.logit_scale" else v for k, v in ref.state_dict().items()}
        block = model.blocks[0]
        block.load_state_dict(sd, strict=True)
        with torch.no_grad():
            out = block(x.reshape(2, g * g, D), ForwardState.start((g, g), 0))
            torch.testing.assert_close(out, ref(x).reshape(2, g * g, D), atol=1e-5, rtol=1e-5)


def test_patch_merge_norm_last_equals_timm_v2():
    """``patch_merge`` with ``norm_last`` is v2's PatchMerging: reduction, then the norm over D_out."""
    spec = load_spec("swin_tiny", {"img_size": 40, "stages": [{"depth": 1, "embed_dim": 16, "num_heads": 1},
                                                              {"depth": 1, "embed_dim": 32, "num_heads": 2}],
                                   "layers": [], "attention": {"name": "window", "params": {"window_size": 5}},
                                   "transition": {"name": "patch_merge", "params": {"norm_last": True}}})
    merge = build_model(spec, seed=0).transitions["1"]
    ref = v2.PatchMerging(dim=16, out_dim=32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    merge.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 10, 10, 16)
    with torch.no_grad():
        out, state = merge(x.reshape(2, 100, 16), ForwardState.start((10, 10), 0))
        torch.testing.assert_close(out, ref(x).reshape(2, 25, 32), atol=1e-5, rtol=1e-5)
    assert merge.norm.weight.shape == (32,) and state.grid == (5, 5)


def test_params_that_need_another_bias_are_refused():
    with pytest.raises(Exception, match="pretrained_window_size needs rel_pos: cpb"):
        _one_block(8, 2, 0, rel_pos="table", pretrained_window_size=4)
    with pytest.raises(Exception, match="cpb_drop needs rel_pos: cpb_cr"):
        _one_block(8, 2, 0, rel_pos="cpb", cpb_drop=0.1)
