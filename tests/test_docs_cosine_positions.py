"""The plugin guide's worked cosine attention honours the position encoding it runs under: with
``relpos_mlp`` (a bias inside attention) its output depends on the position weights. The code is
the guide's own block, executed as tests/test_docs.py executes it."""
from __future__ import annotations

import pytest
import torch
from conftest import REPO, TINY
from test_docs import blocks, run_block

import vitlab

pytestmark = pytest.mark.usefixtures("single_thread")


def _cosine_plugin():
    [block] = [b for b in blocks("python", REPO / "docs" / "plugins.md") if "class CosineAttention" in b.code]
    return run_block(block)


def test_cosine_attention_uses_the_position_bias():
    plugin = _cosine_plugin()
    assert plugin.vitlab_api == 2
    registry = vitlab.make_plugin_manager(entry_points=False, plugins=[("cosine", plugin)])[1]
    spec = vitlab.load_spec({**TINY, "attention": "cosine", "pos_embed": "relpos_mlp"}, registry=registry)
    model = vitlab.build_model(spec, registry=registry, seed=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        for p in model.pos_embed.parameters():  # only the position weights change
            p.add_(torch.randn_like(p))
        after = model(images)
    assert model.pos_embed.gives_attn_bias() and sum(p.numel() for p in model.pos_embed.parameters()) > 0
    assert not torch.allclose(before, after, atol=1e-4), "the attention ignored the position bias"
