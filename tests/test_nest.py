"""NesT's pieces in the architecture space: the ``conv_pool`` block aggregation (both paddings, the
position table per level it carries) and the ``adaptive_avg`` pool, and NesT's table layout.

References: timm's own ``ConvPool``, TF "same" padding written out by hand, a plain mean.
"""
from __future__ import annotations

import functools

import pytest
import torch

from vitlab import analyze, build_model, load_spec
from vitlab.components.nest import same_pads
from vitlab.state import ForwardState
from vitlab.timm_interop.families.nest import blockify, deblockify, heads_first, heads_last

nest = pytest.importorskip("timm.models.nest")


def _spec(padding: str = "symmetric", pos_embed: bool = True, img: int = 32, **changes):
    return load_spec({
        "img_size": img, "patch_size": 4, "class_token": False, "pos_embed": "learned", "num_classes": 0,
        "norm": {"name": "layernorm", "params": {"eps": 1e-6}}, "pool": "adaptive_avg",
        "attention": {"name": "window", "params": {"window_size": 4}},
        "transition": {"name": "conv_pool", "params": {"padding": padding, "pos_embed": pos_embed}},
        "stages": [{"depth": 1, "embed_dim": 16, "num_heads": 2}, {"depth": 1, "embed_dim": 32, "num_heads": 2}],
        **changes})


@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_conv_pool_equals_timm_conv_pool(padding):
    """Without its table, ``conv_pool`` is timm's ``ConvPool`` (pad_type '' or 'same') on the grid."""
    model = build_model(_spec(padding, pos_embed=False), seed=0).eval()
    pool = model.transitions["1"]
    ref = nest.ConvPool(16, 32, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                        pad_type="same" if padding == "same" else "").eval()
    ref.load_state_dict(pool.state_dict(), strict=True)
    x = torch.randn(2, 64, 16)  # an 8x8 grid
    with torch.no_grad():
        out, state = pool(x, ForwardState.start((8, 8), 0).replace(stage_index=1))
        want = ref(x.transpose(1, 2).reshape(2, 16, 8, 8))  # (B, 32, 4, 4)
    assert state.grid == (4, 4)
    torch.testing.assert_close(out, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_same_padding_by_hand():
    """TF "same" for a 3x3 pool of stride 2: nothing before and one after on an even side, one each
    on an odd side; the grid halves, rounding up, as with the symmetric padding."""
    assert [same_pads(g) for g in (8, 7, 2, 1)] == [(0, 1), (1, 1), (0, 1), (1, 1)]
    for padding in ("symmetric", "same"):
        model = build_model(_spec(padding, img=28), seed=0)  # a 7x7 grid -> 4x4
        assert model.stage_grids == [(7, 7), (4, 4)]


def test_the_table_per_level_is_added_after_pooling():
    """``pos_embed: true`` builds the recipe's learned table for the next level's grid and width,
    and adds it: moving it moves the tokens by as much."""
    model = build_model(_spec(), seed=0).eval()
    pool = model.transitions["1"]
    assert tuple(pool.pos_embed.weight.shape) == (1, 16, 32)
    x = torch.randn(2, 64, 16)
    state = ForwardState.start((8, 8), 0).replace(stage_index=1)
    with torch.no_grad():
        before, _ = pool(x, state)
        pool.pos_embed.weight.add_(1.0)
        after, _ = pool(x, state)
    torch.testing.assert_close(after - before, torch.ones_like(before))


def test_adaptive_avg_is_the_mean_and_counted_as_fvcore_counts_it():
    """The same features as ``avg``; the pool adds one FLOP per pooled element (fvcore's count of
    timm's ``adaptive_avg_pool2d``), where ``avg``'s mean is free."""
    spec = _spec()
    model = build_model(spec, seed=0).eval()
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(model.pool(x), x.mean(dim=1))
    avg = spec.model_copy(update={"pool": spec.pool.model_copy(update={"name": "avg"})})
    assert analyze(spec).flops - analyze(avg).flops == 16 * 32  # the last level's 4x4 grid, 32 wide


def test_blockify_orders_and_head_orders_are_inverses():
    """timm NesT's blockified tables and its (head_dim, heads) projection inputs, read and written."""
    grid = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid in raster order
    blocks = blockify(grid, 2)  # (1, 4 blocks, 4 tokens, 1)
    assert blocks[0, :, :, 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert torch.equal(deblockify(blocks), grid)
    w = torch.randn(6, 12)
    assert torch.equal(heads_first(heads_last(w, 3), 3), w)
    assert torch.equal(heads_last(w, 3)[:, :3], w[:, [0, 4, 8]])  # channel 0 of each head first
