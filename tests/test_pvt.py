"""PVTv2's and Twins' pieces in the architecture space, against timm's own layers with the same
weights: spatial-reduction attention (strided and linear), the conv MLP, the stage transition
with its closing norm, and the bundled pvt_v2_b0 recipe."""
from __future__ import annotations

import pytest
import torch

from vitlab import SpecError, analyze, build_model, load_spec
from vitlab.state import ForwardState

pvt = pytest.importorskip("timm.models.pvt_v2")

D, HEADS = 32, 2


def _model(**changes):
    sizes = {} if "stages" in changes else {"embed_dim": D, "num_heads": HEADS, "depth": 1}
    spec = {"img_size": 32, "patch_size": 4, **sizes, "class_token": False,
            "pos_embed": "none", "pool": "avg", "num_classes": 0, "block": "prenorm_grid", "mlp": "conv_mlp",
            "norm": {"name": "layernorm", "params": {"eps": 1e-6}}, **changes}
    return build_model(load_spec(spec), seed=0).eval()


@pytest.mark.parametrize("sr, linear", [(1, False), (2, False), (4, False), (1, True)])
def test_block_equals_timm_pvt_block(sr, linear):
    """A ``prenorm_grid`` block of ``sra`` and ``conv_mlp`` is timm's PVTv2 ``Block`` on an 8x8 grid."""
    block = _model(attention={"name": "sra", "params": {"sr_ratio": sr, "linear": linear}},
                   mlp={"name": "conv_mlp", "params": {"extra_relu": linear}}).blocks[0]
    ref = pvt.Block(dim=D, num_heads=HEADS, sr_ratio=sr, linear_attn=linear, qkv_bias=True).eval()
    ref.load_state_dict(block.state_dict(), strict=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        block.load_state_dict(ref.state_dict())
        x = torch.randn(2, 64, D)
        torch.testing.assert_close(block(x, ForwardState.start((8, 8), 0)), ref(x, (8, 8)), atol=1e-5, rtol=1e-5)


def test_conv_mlp_refuses_a_block_without_the_grid():
    with pytest.raises(Exception, match="prenorm_grid"):
        _model(block="prenorm")(torch.randn(1, 3, 32, 32))


def test_transition_in_norm_and_grids():
    stages = [{"depth": 1, "embed_dim": 16, "num_heads": 1},
              {"depth": 1, "embed_dim": 32, "num_heads": 2, "transition": {"name": "conv_embed", "params": {"in_norm": True}}}]
    model = _model(stages=stages, attention={"name": "sra", "params": {"sr_ratio": 2}}, dynamic_img_size=True)
    assert "transitions.1.in_norm.weight" in model.state_dict()
    assert model.stage_grids == [(8, 8), (4, 4)]
    assert model(torch.randn(1, 3, 40, 24)).shape == (1, 32)  # a 10x6 grid, then 5x3


def test_bundled_recipe_is_pvt_v2_b0():
    spec = load_spec("pvt_v2_b0")
    assert [st.embed_dim for st in spec.stages] == [32, 64, 160, 256]
    assert analyze(spec).stage_tokens == [3136, 784, 196, 49]


def test_a_conv_mlp_outside_a_block_that_hands_it_the_grid_is_refused_at_validation():
    """It once validated and failed at the first forward; now the spec names the MLP and the blocks
    that can hold it (``Mlp.takes_state`` / ``Block.gives_mlp_state``)."""
    with pytest.raises(SpecError, match="mlp: conv_mlp needs the patch grid, which block 'prenorm' does not "
                                               "hand its MLP; use a block that does: .*prenorm_grid"):
        load_spec("pvt_v2_b0", overrides={"block.name": "prenorm"})
