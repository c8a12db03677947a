"""Swin's pieces in the architecture space: shifted windows with their mask, Swin v1's relative
position table, padding, the stepped ``at`` grammar, patch merging and the bundled recipes.

References: timm's own ``SwinTransformerBlock`` and ``PatchMerging``, and masks and indices
written out by hand.
"""
from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab import analyze, build_model, load_spec
from vitlab.components.window import SHIFT_MASK, shift_mask, window_slots
from vitlab.layout import parse_at
from vitlab.maps import record_attention
from vitlab.state import ForwardState

swin = pytest.importorskip("timm.models.swin_transformer")

D, HEADS = 32, 2


def _one_block(img: int, window: int, shift, rel_pos: str = "table", **changes):
    spec = {"img_size": img, "patch_size": 4, "embed_dim": D, "num_heads": HEADS, "depth": 1, "class_token": False,
            "pos_embed": "none", "pool": "avg", "num_classes": 0, "norm": {"name": "layernorm", "params": {"eps": 1e-5}},
            "attention": {"name": "window", "params": {"window_size": window, "shift": shift, "rel_pos": rel_pos}},
            **changes}
    return build_model(load_spec(spec), seed=0).eval()


# img 32 / 4 = an 8x8 grid; 40 -> 10x10 (padded to 12x12 under shift); 24 -> 6x6 (padded to 8x8)
@pytest.mark.parametrize("img, window, shift", [(32, 4, 2), (32, 4, 0), (40, 4, 2), (48, 3, 1), (24, 4, 2), (16, 4, 2)])
def test_block_equals_timm_swin_block(img, window, shift):
    """A prenorm block with ``window`` (shift, table) is timm's ``SwinTransformerBlock``: the roll,
    the padding, the mask and the bias table, with the same weights (and the table under timm's name)."""
    g = img // 4
    block = _one_block(img, window, shift).blocks[0]
    ref = swin.SwinTransformerBlock(dim=D, input_resolution=(g, g), num_heads=HEADS, window_size=window,
                                    shift_size=shift).eval()
    ref.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, g, g, D)
    with torch.no_grad():
        out = block(x.reshape(2, g * g, D), ForwardState.start((g, g), 0))
        torch.testing.assert_close(out, ref(x).reshape(2, g * g, D), atol=1e-5, rtol=1e-5)


def test_shift_and_table_change_the_output():
    """Neither param is inert: the same weights give another output without the shift or the table."""
    shifted, plain = _one_block(32, 4, 2), _one_block(32, 4, 0)
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(shifted(x), plain(x), atol=1e-4)
        table = shifted.blocks[0].attn.relative_position_bias_table
        before = shifted(x)
        table.add_(1.0 * torch.arange(table.shape[0])[:, None])
        assert not torch.allclose(shifted(x), before, atol=1e-4)
    assert table.shape == ((2 * 4 - 1) ** 2, HEADS)
    assert "relative_position_bias_table" not in dict(_one_block(32, 4, 0, rel_pos="none").named_parameters()).get(
        "blocks.0.attn.relative_position_bias_table", "")


def test_shift_mask_by_hand():
    """A 4x4 grid, windows of 2, shift 1: after the roll, the last row and column come from the
    other edge. Regions per axis: [0, 2) -> 0, [2, 3) -> 1, [3, 4) -> 2 (timm's slices)."""
    mask = shift_mask((4, 4), 2, (1, 1))
    assert mask.shape == (4, 4, 4)
    region = torch.tensor([[0, 0, 1, 2]])
    labels = region.T * 3 + region  # (4, 4) region of each patch of the rolled grid
    for win, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        lab = labels[r:r + 2, c:c + 2].reshape(-1)
        want = torch.where(lab[:, None] == lab[None, :], 0.0, SHIFT_MASK)
        torch.testing.assert_close(mask[win], want)
    assert (mask[0] == 0).all()  # the top-left window is whole after the roll
    assert not torch.any(shift_mask((4, 4), 2, (0, 0)))  # no shift: one region


def test_window_slots_follow_the_shift():
    slots = window_slots((4, 4), (4, 4), 2, shift=(1, 1))
    # rolled[r, c] = patch ((r + 1) % 4, (c + 1) % 4): the first window holds patches 5, 6, 9, 10
    assert slots[0].tolist() == [5, 6, 9, 10]
    assert slots[3].tolist() == [15, 12, 3, 0]


def test_grid_in_one_window_is_not_shifted():
    """timm's rule: no shift on an axis where the grid fits in one window (Swin-T's last stage)."""
    shifted, plain = _one_block(16, 4, 2), _one_block(16, 4, 0)  # a 4x4 grid, one 4x4 window
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(shifted(x), plain(x))


def test_shifted_maps_sit_on_the_grid_and_fused_equals_recorded():
    model = _one_block(32, 4, 2, reg_tokens=1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
    (rec,) = record_attention(model, x)
    P = 1
    assert rec.map.shape == (1, HEADS, P + 64, P + 64)
    torch.testing.assert_close(rec.map.sum(-1), torch.ones(1, HEADS, P + 64))
    # patch (0, 0) sits in the rolled grid's last window, with rows and columns 6, 7, 0, 1; the mask
    # keeps it to its own region, rows and columns 0, 1 (a masked weight is exp(-100), not 0)
    row0 = rec.map[0, 0, P + 0, P:].reshape(8, 8)
    assert set(map(tuple, (row0 > 1e-20).nonzero().tolist())) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    model.blocks[0].attn.record_maps = True
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_shift_is_validated():
    with pytest.raises(vitlab.SpecError, match="shift 4 must be below window_size 4"):
        _one_block(32, 4, 4)
    with pytest.raises(vitlab.SpecError, match="rel_pos"):
        _one_block(32, 4, 0, rel_pos="mlp")
    assert _one_block(32, 4, [2, 1]).blocks[0].attn.shift == (2, 1)


def test_shift_adds_no_flops():
    """The roll, the mask and the table are free: a shifted block counts like an unshifted one."""
    assert analyze(_one_block(32, 4, 2).spec).flops == analyze(_one_block(32, 4, 0).spec).flops


# --- the at grammar's step ---------------------------------------------------------------------------

@pytest.mark.parametrize("at, expected", [
    ("1-11:2", [1, 3, 5, 7, 9, 11]), ("1-10:2", [1, 3, 5, 7, 9]), ("0-3, 1-11:4", [0, 1, 2, 3, 5, 9]),
    ("2-3:5", [2]), ("1-9:2,1-5:2", [1, 3, 5, 7, 9]), ("0-11:3,1-11:3", [0, 1, 3, 4, 6, 7, 9, 10]),
])
def test_parse_at_with_a_step(at, expected):
    assert parse_at(at, 12) == expected


@pytest.mark.parametrize("at, message", [
    ("1-11:0", "step 0"), ("3:2", "not an index or a range"), ("1-12:1", "block 12 does not exist"),
    ("1-11:٢", "not an index or a range"), ("1-" + "9" * 5000 + ":2", "does not exist"),
])
def test_parse_at_refuses_bad_steps(at, message):
    with pytest.raises(ValueError, match=message):
        parse_at(at, 12)


def test_many_stepped_ranges_stay_bounded():
    at = ",".join(f"{r}-9999:{s}" for s in range(2, 200) for r in range(s))  # ~20k ranges
    assert len(parse_at(at, 10_000)) == 10_000


# --- patch merging -----------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(4, 4), (5, 3)])
def test_patch_merge_equals_timm_patch_merging(grid):
    """``patch_merge`` is timm's ``PatchMerging``: x0..x3 in timm's order, norm then reduction, odd
    sides zero-padded."""
    spec = load_spec("swin_tiny", {"img_size": [4 * grid[0] * 8, 4 * grid[1] * 8]})
    model = build_model(spec, seed=0, device="cpu").eval()
    merge = model.transitions["1"]
    ref = swin.PatchMerging(dim=96, out_dim=192).eval()
    ref.load_state_dict(merge.state_dict(), strict=True)
    x = torch.randn(2, *grid, 96)
    with torch.no_grad():
        out, state = merge(x.reshape(2, -1, 96), ForwardState.start(grid, 0))
        want = ref(x)
    assert state.grid == tuple(want.shape[1:3])
    torch.testing.assert_close(out, want.reshape(2, -1, 192), atol=1e-5, rtol=1e-5)


# --- recipes -----------------------------------------------------------------------------------------

def test_swin_recipes_tokens_per_stage_and_shifts():
    for name, widths in (("swin_tiny", [96, 192, 384, 768]), ("vit_tiny_swin", [192] * 4)):
        spec = load_spec(name)
        assert [c.grid_size for c in spec.stage_contexts()] == [(56, 56), (28, 28), (14, 14), (7, 7)]
        assert [st.embed_dim for st in spec.stages] == widths
        shifts = [p.selections["attention"].params["shift"] for p in spec.block_plans()]
        assert shifts == [0, 3] * 5 + [0, 0]
    report = analyze("swin_tiny")
    assert report.stage_tokens == [3136, 784, 196, 49]
