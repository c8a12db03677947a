"""TinyViT's components (``mbconv``, ``tiny_vit`` attention and block, ``conv_merge``): what the
generic suites cannot see in a flat tiny model (timm parity is tests/test_timm_tiny_vit.py)."""
from __future__ import annotations

import pytest
import torch

from vitlab import build_model, load_spec

# a staged TinyViT of 32 px: grids 8 (mbconv), 4, 2; windows 3 (padded) and 2
DATA = {
    "img_size": 32, "patch_size": 4, "class_token": False, "num_classes": 0, "final_norm": False,
    "patch_embed": {"name": "levit_stem", "params": {"act": "gelu"}}, "pos_embed": "none",
    "block": "tiny_vit", "attention": {"name": "tiny_vit", "params": {"window_size": 3}},
    "pool": {"name": "adaptive_avg", "params": {"norm": True}}, "transition": "conv_merge",
    "stages": [{"depth": 1, "embed_dim": 16, "num_heads": 1}, {"depth": 1, "embed_dim": 32, "num_heads": 2},
               {"depth": 1, "embed_dim": 32, "num_heads": 2}],
    "layers": [{"at": "0", "block": "mbconv"}, {"at": "2", "attention": {"name": "tiny_vit",
                                                                          "params": {"window_size": 2}}}],
}


def _outputs(data: dict, x: torch.Tensor) -> torch.Tensor:
    model = build_model(load_spec(data), seed=0).eval()
    for m in model.modules():  # BatchNorm's identity init would hide a branch: move its statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
    with torch.no_grad():
        return model(x)


def test_grids_halve_and_the_mbconv_stage_builds_no_attention():
    model = build_model(load_spec(DATA), device="meta")
    assert model.stage_grids == [(8, 8), (4, 4), (2, 2)]
    assert not hasattr(model.blocks[0], "attn") and not hasattr(model.blocks[0], "mlp")
    assert tuple(model.blocks[1].attn.attention_biases.shape) == (2, 9)  # heads x window², not (2 w - 1)²


def test_bias_rows_are_timms_offsets():
    from timm.models.tiny_vit import Attention

    ours = build_model(load_spec(DATA), seed=0).blocks[1].attn.attention_bias_idxs
    theirs = Attention(32, 16, 2, attn_ratio=1, resolution=(3, 3)).attention_bias_idxs
    assert torch.equal(ours, theirs)


def test_conv_merge_activation_shows():
    x = torch.randn(1, 3, 32, 32)
    relu = {**DATA, "transition": {"name": "conv_merge", "params": {"act": "relu"}}}
    assert not torch.allclose(_outputs(DATA, x), _outputs(relu, x))


def test_odd_grids_round_up_and_a_one_by_one_grid_trains_on_one_image():
    data = {**DATA, "img_size": 36}  # grids 9, 5, 3
    model = build_model(load_spec(data), seed=0)
    assert model.stage_grids == [(9, 9), (5, 5), (3, 3)]
    tiny = {**DATA, "img_size": 16}  # grids 4, 2, 1: BatchNorm of one value per channel in training
    model = build_model(load_spec(tiny), seed=0).train()
    model(torch.randn(1, 3, 16, 16)).sum().backward()


def test_local_conv_size_must_be_odd():
    with pytest.raises(Exception, match="odd local_conv_size"):
        load_spec({**DATA, "block": {"name": "tiny_vit", "params": {"local_conv_size": 4}}})
