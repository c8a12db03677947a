"""VOLO's components on their own: outlook attention against a direct sum over neighbourhoods, the
stem's grid, the downsample's position table, and the token-labeling head."""
from __future__ import annotations

import pytest
import torch

from vitlab import build_model, load_spec
from vitlab.errors import SpecError

# a small VOLO: outlookers, then self-attention after the downsample, then class attention
SPEC = {
    "name": "volo_small", "img_size": 32, "patch_size": 4, "num_classes": 10, "class_token": False,
    "patch_embed": {"name": "volo_stem", "params": {"hidden_dim": 8}}, "pos_embed": {"name": "none"},
    "pool": {"name": "token_aux"},
    "stages": [{"depth": 1, "embed_dim": 16, "num_heads": 2},
               {"depth": 1, "embed_dim": 32, "num_heads": 4, "transition": {"name": "volo_downsample"}},
               {"depth": 1, "embed_dim": 32, "num_heads": 4, "transition": {"name": "class_token"}}],
    "layers": [{"at": 0, "attention": {"name": "outlook"}},
               {"at": 2, "attention": {"name": "class_attn"}, "block": {"name": "cait_class"}}],
}


def test_outlook_attention_is_a_weighted_sum_over_neighbourhoods():
    from vitlab.state import ForwardState

    model = build_model(load_spec(SPEC), seed=0).eval()
    attn = model.blocks[0].attn
    grid, (B, D, h) = (4, 6), (1, 16, 2)
    x = torch.randn(B, grid[0] * grid[1], D)
    with torch.no_grad():
        ours = attn(x, ForwardState.start(grid, 0))
        # direct: each pooled location n weighs the values of its 3x3 neighbourhood (stride 2, padding 1) into
        # each of its 9 positions, and every output location sums what it receives
        v = attn.v(x).reshape(B, *grid, h, D // h)
        pooled = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(B, D, *grid), 2, 2, ceil_mode=True)
        out = torch.zeros(B, *grid, h, D // h)
        for i in range(2):
            for j in range(3):
                w = attn.attn(pooled[:, :, i, j]).reshape(B, h, 9, 9) * (D // h) ** -0.5
                w = w.softmax(-1)  # (B, heads, position written, position read)
                cells = [(2 * i - 1 + a, 2 * j - 1 + b) for a in range(3) for b in range(3)]
                for p, (r, c) in enumerate(cells):
                    if 0 <= r < grid[0] and 0 <= c < grid[1]:
                        for q, (r2, c2) in enumerate(cells):
                            if 0 <= r2 < grid[0] and 0 <= c2 < grid[1]:
                                out[:, r, c] += w[:, :, p, q, None] * v[:, r2, c2]
        ref = attn.proj(out.reshape(B, -1, D))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_token_aux_head_adds_half_the_best_patch_logits():
    model = build_model(load_spec(SPEC), seed=0).eval()
    x = torch.randn(2, 9, 32)
    head = model.head
    want = head.weight @ x[:, 0].T
    assert torch.allclose(head(x), (want.T + head.bias) + 0.5 * head.aux(x[:, 1:]).max(1)[0], atol=1e-6)
    features = build_model(load_spec({**SPEC, "num_classes": 0}), seed=0).eval()
    assert features(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_stem_and_downsample_grids():
    model = build_model(load_spec(SPEC), device="meta")
    assert model.stage_grids == [(8, 8), (4, 4), (4, 4)]
    assert tuple(model.transitions["1"].pos_embed.shape) == (1, 4, 4, 32)
    with pytest.raises(SpecError, match="even side"):
        load_spec({**SPEC, "patch_size": 3})


def test_what_the_components_refuse():
    with pytest.raises(SpecError, match="no class or register tokens"):
        load_spec({**SPEC, "layers": [{"at": 2, "attention": {"name": "outlook"}, "block": {"name": "cait_class"}}]})
    with pytest.raises(SpecError, match="folding back"):
        load_spec({**SPEC, "layers": [{"at": 0, "attention": {"name": "outlook", "params": {"padding": 3}}},
                                      *SPEC["layers"][1:]]})
    model = build_model(load_spec({**SPEC, "dynamic_img_size": True}), seed=0).eval()
    with pytest.raises(SpecError, match="position table is for a 4x4 grid"):
        model(torch.randn(1, 3, 48, 48))
