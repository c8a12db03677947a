"""CoaT-Lite's components: each stage's position encoding is built once, by the transition into it,
and shared by the stage's blocks through the forward state; factorized attention is its formula;
the position encoding's head groups are checked against the heads."""
from __future__ import annotations

import pytest
import torch

from vitlab import SpecError, build_model, load_spec
from vitlab.context import BuildContext
from vitlab.state import ForwardState

STAGED = {
    "name": "coat_small_test", "img_size": 32, "patch_size": 4,
    "class_token": True, "patch_embed": {"name": "overlap", "params": {"padding": 0}},
    "pos_embed": {"name": "coat_conv", "params": {"windows": [3, 5], "head_splits": [1, 1]}},
    "block": "coat_serial", "attention": "factor", "transition": "coat_embed",
    "stages": [{"depth": 1, "embed_dim": 16, "num_heads": 2}, {"depth": 2, "embed_dim": 32, "num_heads": 2}],
}


def test_a_stage_shares_the_position_encoding_its_transition_builds():
    model = build_model(load_spec(STAGED), seed=0).eval()
    names = {n for n, _ in model.named_parameters()}
    assert {"pos_embed.proj.weight", "transitions.1.pos_embed.proj.weight", "transitions.1.pos_embed.conv_list.1.weight",
            "transitions.1.cls_token"} <= names
    assert not any(n.startswith("blocks.") and "pos_embed" in n for n in names)  # no copy per block
    seen = []
    model.blocks[2].register_forward_pre_hook(lambda m, a: seen.append(a[1]))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert seen[0].positions is model.transitions["1"].pos_embed and seen[0].num_tokens == 1 + 16
        model.transitions["1"].pos_embed.proj.weight.zero_()
        assert not torch.allclose(model(x), before)  # stage 1's blocks run its convolution


def test_in_norm_norms_the_tokens_received():
    data = {**STAGED, "stages": [STAGED["stages"][0], {**STAGED["stages"][1],
                                                       "transition": {"name": "coat_embed", "params": {"in_norm": True}}}]}
    names = {n for n, _ in build_model(load_spec(data), device="meta").named_parameters()}
    assert "transitions.1.in_norm.weight" in names


def test_factor_attention_is_its_formula_without_conv_positions():
    spec = load_spec({"name": "f", "img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                      "attention": "factor", "pos_embed": "none"})
    attn = build_model(spec, seed=0).blocks[0].attn.eval()
    x = torch.randn(2, 17, 16)
    q, k, v = attn.qkv(x).reshape(2, 17, 3, 2, 8).permute(2, 0, 3, 1, 4)
    want = (q @ (k.softmax(dim=2).transpose(-1, -2) @ v)) * 8 ** -0.5  # (B, heads, N, hd)
    with torch.no_grad():
        got = attn(x, ForwardState.start((4, 4), 1))
        torch.testing.assert_close(got, attn.proj(want.transpose(1, 2).reshape(2, 17, 16)))


def test_head_groups_must_sum_to_the_heads():
    bad = {**STAGED, "pos_embed": {"name": "coat_conv", "params": {"windows": [3, 5], "head_splits": [1, 2]}}}
    with pytest.raises(SpecError, match="summing to num_heads 2"):
        load_spec(bad)
    with pytest.raises(SpecError, match="one head_splits entry per window"):
        load_spec({**STAGED, "pos_embed": {"name": "coat_conv", "params": {"windows": [3, 5]}}})
    with pytest.raises(SpecError, match="odd kernel_size"):
        load_spec({**STAGED, "pos_embed": {"name": "coat_conv", "params": {"windows": [4], "head_splits": [2]}}})
