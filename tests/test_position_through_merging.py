"""Position information through token changes: kept where tokens stay on a grid (pooling),
recorded as lost where they leave it (merging), and never silently dropped.

References: the pooled state's transform and bias equal the position encoding's own at the new
grid (computed here from the encoding directly); the composed bias is written out by hand; the
merging block of ``tests/plugins/merging_block.py`` averages pairs, 197 - 8 = 189 tokens.
"""
from __future__ import annotations


import pytest
import torch
from conftest import TINY, invoke_cli, load_test_plugin, one_error

import vitlab
from vitlab.state import ForwardState

pytestmark = pytest.mark.usefixtures("single_thread")



REGISTRY = vitlab.make_plugin_manager(entry_points=False, plugins=[("merging", load_test_plugin("merging_block.py"))])[1]
# block 0 merges 8 tokens; blocks 1-3 are plain pre-norm blocks on the merged tokens
MERGE_FIRST = {**TINY, "depth": 4, "layers": [{"at": 0, "block": {"name": "pair_merge", "params": {"r": 4}}}]}


def _model(positions: str, **changes):
    spec = vitlab.load_spec({**MERGE_FIRST, "pos_embed": positions, **changes}, registry=REGISTRY)
    return vitlab.build_model(spec, registry=REGISTRY, seed=0).eval()


def _positions(name: str):
    spec = vitlab.load_spec({**TINY, "pos_embed": name}, registry=REGISTRY)
    return vitlab.build_model(spec, registry=REGISTRY, seed=0).eval().pos_embed  # eval: no dropout in the bias MLP


# --- the state ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rope", "relpos_mlp"])
def test_pooling_recomputes_positions_for_the_new_grid(name):
    pe = _positions(name)
    state = ForwardState.start((4, 4), 1, positions=pe).replace(block_index=0)
    pooled = state.regrid((2, 2))
    assert pooled.positions_lost_at is None and pooled.grid_lost_at is None
    q = k = torch.randn(1, 2, 1 + 4, 16)
    if name == "rope":  # the transform at the pooled grid is the encoding's own at 2x2
        torch.testing.assert_close(pooled.transform_qk(q, k), pe.qk_transform((2, 2))(q, k))
    else:
        torch.testing.assert_close(pooled.attn_bias, pe.attn_bias((2, 2), 1))
        assert pooled.attn_bias.shape[-1] == 1 + 4


@pytest.mark.parametrize("name", ["rope", "relpos_mlp"])
def test_merging_records_where_positions_were_lost(name):
    state = ForwardState.start((4, 4), 1, positions=_positions(name)).replace(block_index=2)
    merged = state.regrid(None, num_tokens=9)
    assert (merged.grid, merged.grid_lost_at, merged.positions_lost_at) == (None, 2, 2)
    assert merged.qk_transform is None and merged.attn_bias is None
    later = merged.replace(block_index=3).regrid(None, num_tokens=5)  # the first loss is the one named
    assert (later.grid_lost_at, later.positions_lost_at) == (2, 2)
    with pytest.raises(vitlab.SpecError, match=r"needs pos_embed '%s'.*block 2 merged" % name):
        later.transform_qk(torch.zeros(1, 1, 5, 16), torch.zeros(1, 1, 5, 16))


def test_merging_without_positions_inside_attention_loses_only_the_grid():
    state = ForwardState.start((4, 4), 1, positions=_positions("learned")).replace(block_index=0)
    merged = state.regrid(None, num_tokens=9)
    assert (merged.grid_lost_at, merged.positions_lost_at) == (0, None)
    with pytest.raises(vitlab.SpecError, match=r"window attention needs tokens on a patch grid, but block 0 merged"):
        merged.require_grid("window attention")


def test_a_merging_block_may_carry_positions_itself():
    state = ForwardState.start((4, 4), 1, positions=_positions("relpos_mlp")).replace(block_index=0)
    own = torch.zeros(1, 1, 9, 9)
    carried = state.regrid(None, num_tokens=9, attn_bias=own)
    assert carried.positions_lost_at is None and carried.attn_bias is own


def test_a_blocks_own_bias_adds_to_the_position_bias():
    pos = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, heads=1, N=2, N)
    state = ForwardState(grid=None, num_prefix=0, num_tokens=2, attn_bias=pos)
    log_size = torch.tensor([0.5, -1.0]).reshape(1, 1, 1, 2)  # per key
    composed = state.add_attn_bias(log_size).attn_bias
    torch.testing.assert_close(composed, torch.tensor([[[[0.5, 0.0], [2.5, 2.0]]]]))
    assert state.replace(attn_bias=None).add_attn_bias(log_size).attn_bias is log_size


# --- the model ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rope", "relpos_mlp"])
def test_positions_inside_attention_after_merging_are_refused_naming_both_blocks(name):
    model = _model(name)
    with pytest.raises(vitlab.SpecError) as err:
        model(torch.randn(1, 3, 32, 32))
    msg = str(err.value)
    assert msg == (f"attention in block 1 needs pos_embed '{name}' (its q/k transform or attention bias), but block 0 "
                   "(block 'pair_merge' from plugin 'merging') merged the tokens off the patch grid and lost it; use a "
                   "position encoding added to the tokens (learned, sincos2d) or a merging block that carries "
                   "positions (docs/plugins.md)")
    with pytest.raises(vitlab.VitlabError, match="block 0 .* merged the tokens"):  # counting traces the same path
        vitlab.analyze(model, second_opinion=False)


def test_merging_is_fine_with_positions_added_to_the_tokens():
    x = torch.randn(1, 3, 32, 32)
    tokens, state = _model("learned").forward_tokens(x)
    assert tokens.shape == (1, 1 + 16 - 4, 32) and state.grid is None and state.grid_lost_at == 0


def test_merging_as_the_last_block_loses_nothing_that_is_used():
    layers = [{"at": 3, "block": {"name": "pair_merge", "params": {"r": 4}}}]
    out = _model("rope", layers=layers)(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)


@pytest.mark.parametrize("changes, match", [
    ({"attention": {"name": "window", "params": {"window_size": 2}}},
     r"window attention \(block 1\) needs tokens on a patch grid, but block 0 merged them off it"),
    ({"pos_embed": {"name": "peg", "params": {"at_block": 1}}},
     r"pos_embed 'peg' \(after block 1\) needs tokens on a patch grid, but block 0 merged them off it"),
])
def test_components_that_need_the_grid_name_the_block_that_lost_it(changes, match):
    model = _model("learned", **changes)
    with pytest.raises(vitlab.SpecError, match=match):
        model(torch.randn(1, 3, 32, 32))


# --- the CLI: one line at build, and the real tokens per block ----------------------------------------

def test_build_and_validate_refuse_rope_after_merging_in_one_line(tmp_path):
    recipe = tmp_path / "merge.yaml"
    recipe.write_text("extends: vit_tiny_patch16_224\nname: merge\ndepth: 4\n"
                      "layers: [{at: 0, block: {name: pair_merge, params: {r: 8}}}]\n")
    with vitlab.use_registry(REGISTRY):
        line = one_error(invoke_cli("build", recipe, "--set", "pos_embed.name=rope"))
        assert "attention in block 1 needs pos_embed 'rope'" in line and "block 0 (block 'pair_merge'" in line
        assert one_error(invoke_cli("validate", recipe, "--set", "pos_embed.name=rope")) == line
        assert invoke_cli("validate", recipe).exit_code == 0
        res = invoke_cli("build", recipe)
    assert res.exit_code == 0, res.output
    rows = [" ".join(line.strip("│ ").split()) for line in res.output.splitlines() if "stage 0" in line]
    assert rows == ["stage 0 │ blocks 0: (2, 197, 192) on a 14x14 grid, 3 heads",
                    "stage 0 │ blocks 1-3: (2, 189, 192) merged (no grid), 3 heads"]


def test_a_merging_block_that_carries_the_bias_gives_the_pairwise_mean():
    """``pair_merge`` with ``carry_positions`` hands block 1 the relpos bias merged like the tokens:
    the bias between two merged tokens is the mean over their pairs (hand computation below)."""
    r = 4
    layers = [{"at": 0, "block": {"name": "pair_merge", "params": {"r": r, "carry_positions": True}}}]
    model = _model("relpos_mlp", layers=layers)
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.update(state=args[1]))  # returns None
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (1, 10)  # no refusal: the positions were carried, not lost
    state = seen["state"]
    assert state.positions_lost_at is None and state.grid is None
    B = model.pos_embed.attn_bias((4, 4), 1).detach()  # (1, heads, 17, 17): the bias at block 0
    T, k = 17, 17 - 2 * r  # tokens in, tokens kept as they are
    expected = torch.empty(1, B.shape[1], T - r, T - r)
    for i in range(T - r):
        rows = [i] if i < k else [k + 2 * (i - k), k + 2 * (i - k) + 1]
        for j in range(T - r):
            cols = [j] if j < k else [k + 2 * (j - k), k + 2 * (j - k) + 1]
            expected[0, :, i, j] = sum(B[0, :, a, b] for a in rows for b in cols) / (len(rows) * len(cols))
    torch.testing.assert_close(state.attn_bias, expected)
