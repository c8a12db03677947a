"""Hiera's components (``vitlab.components.hiera``) against hand computations: the ``q_pool``
transition (queries and residual max-pooled on the grid, keys and values from mask units or the
whole grid) and the ``abswin`` position embedding; and the rules their ``check`` enforces."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitlab import SpecError, build_model, load_spec

BASE = {"img_size": 32, "patch_size": 4, "class_token": False, "pos_embed": "none", "pool": "avg",
        "transition": "q_pool", "num_classes": 0}


def _stages(window: int = 4, residual: str = "proj", in_dim: int = 8, out_dim: int = 16) -> dict:
    return {**BASE, "stages": [{"depth": 1, "embed_dim": in_dim, "num_heads": 1},
                               {"depth": 1, "embed_dim": out_dim, "num_heads": 2, "transition": {
                                   "name": "q_pool", "params": {"window_size": window, "residual": residual}}}]}


def _by_hand(t, x: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """The transition written out: 2x2 max pools by reshapes, attention by an explicit softmax."""
    B, N, _ = x.shape
    gh, gw = grid

    def pool(z):  # (B, gh * gw, C) -> (B, gh/2 * gw/2, C)
        return z.reshape(B, gh // 2, 2, gw // 2, 2, -1).amax(dim=(2, 4)).reshape(B, -1, z.shape[-1])

    h = t.norm1(x)
    shortcut = pool(t.proj(h))
    heads, hd = t.attn.heads, t.attn.head_dim
    q, k, v = t.attn.qkv(h).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (B, h, N, hd) each
    out = torch.zeros(B, heads, gh // 2, gw // 2, hd)
    w = window or gh
    for r in range(0, gh, w):  # each mask unit: its pooled queries against its keys
        for c in range(0, gw, w):
            cells = torch.tensor([(r + i) * gw + c + j for i in range(w) for j in range(w)])
            qu = q[:, :, cells].reshape(B, heads, w // 2, 2, w // 2, 2, hd).amax(dim=(3, 5)).reshape(B, heads, -1, hd)
            attn = (qu @ k[:, :, cells].transpose(-1, -2) * hd ** -0.5).softmax(-1)
            out[:, :, r // 2:(r + w) // 2, c // 2:(c + w) // 2] = (attn @ v[:, :, cells]).reshape(
                B, heads, w // 2, w // 2, hd)
    a = t.attn.proj(out.permute(0, 2, 3, 1, 4).reshape(B, -1, heads * hd))
    y = shortcut + a
    return y + t.mlp(t.norm2(y))


@pytest.mark.parametrize("window", [4, 0])
def test_q_pool_is_the_hand_computation(window):
    model = build_model(load_spec(_stages(window)), seed=0).eval()
    t = model.transitions["1"]
    x = torch.randn(2, 64, 8)
    from vitlab.state import ForwardState

    state = ForwardState.start((8, 8), 0).replace(stage_index=1)
    with torch.no_grad():
        y, new = t(x, state)
        want = _by_hand(t, x, (8, 8), window)
    assert new.grid == (4, 4) and y.shape == (2, 16, 16)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_q_pool_residual_pool_concatenates_max_and_mean():
    model = build_model(load_spec(_stages(residual="pool")), seed=0).eval()
    t = model.transitions["1"]
    assert t.proj is None
    x = torch.randn(1, 64, 8)
    grid = x.reshape(1, 8, 8, 8).permute(0, 3, 1, 2)
    want = torch.cat([F.max_pool2d(grid, 2), F.avg_pool2d(grid, 2)], 1).flatten(2).transpose(1, 2)
    from vitlab.components.hiera import pool_grid

    got = torch.cat([pool_grid(x, (8, 8), 2), pool_grid(x, (8, 8), 2, "avg")], -1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("changes, message", [
    ({"class_token": True, "pool": "token"}, "no place for prefix tokens"),
    ({"window": 3}, "multiple of stride"),
    ({"residual": "pool", "out_dim": 24}, "doubles the width"),
])
def test_q_pool_refuses_what_it_cannot_run(changes, message):
    changes = dict(changes)
    args = {k: changes.pop(k) for k in ("window", "residual", "out_dim") if k in changes}
    with pytest.raises(SpecError, match=message):
        load_spec({**_stages(**args), **changes})


def test_abswin_is_a_resampled_global_table_plus_a_tiled_window():
    spec = load_spec({**BASE, "pos_embed": {"name": "abswin", "params": {"global_size": 3, "window_size": 4,
                                                                          "antialias": False}},
                      "stages": [{"depth": 1, "embed_dim": 8, "num_heads": 1}]})
    pe = build_model(spec, seed=0).pos_embed
    from vitlab.state import ForwardState

    x = torch.zeros(1, 64, 8)
    with torch.no_grad():
        got = pe(x, ForwardState.start((8, 8), 0))
    table = F.interpolate(pe.weight, size=(8, 8), mode="bicubic") + pe.window.repeat(1, 1, 2, 2)
    torch.testing.assert_close(got, table.flatten(2).transpose(1, 2))
    with torch.no_grad():  # a grid of part windows takes the tiling's top-left part, prefix tokens none
        got = pe(torch.zeros(1, 1 + 36, 8), ForwardState.start((6, 6), 1))
    table = F.interpolate(pe.weight, size=(6, 6), mode="bicubic") + pe.window.repeat(1, 1, 2, 2)[..., :6, :6]
    torch.testing.assert_close(got, torch.cat([torch.zeros(1, 1, 8), table.flatten(2).transpose(1, 2)], 1))
