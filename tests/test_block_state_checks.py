"""The forward state is checked at every block boundary, and a plugin written for the 0.1 API
fails at build or at the first forward with one line naming it and pointing to docs/migration.md,
never later (a reshape error in another command) and never as an anonymous internal error.

The plugins are ``tests/plugins/old_api.py``: a 0.1 attention that calls its second argument, a
0.1 block ``forward(x)``, and a block that drops a token without returning a new state.
"""
from __future__ import annotations


import pytest
import torch
from conftest import TINY, invoke_cli, load_test_plugin, one_error

import vitlab

pytestmark = pytest.mark.usefixtures("single_thread")



REGISTRY = vitlab.make_plugin_manager(entry_points=False, plugins=[("old", load_test_plugin("old_api.py"))])[1]
IMAGES = torch.randn(1, 3, 32, 32)


def _spec(**changes):
    return vitlab.load_spec({**TINY, **changes}, registry=REGISTRY)


def test_a_block_that_changes_tokens_without_a_state_fails_at_the_first_forward():
    model = vitlab.build_model(_spec(layers=[{"at": 1, "block": "shrinking"}]), registry=REGISTRY, seed=0)
    with pytest.raises(vitlab.PluginError) as err:
        model(IMAGES)
    assert str(err.value) == (
        "block 1 (block 'shrinking' from plugin 'old') returned 16 tokens but its forward state says 17; a "
        "component that changes the tokens returns (x, state.regrid(grid, num_tokens=...)): see docs/migration.md")


def test_the_check_runs_when_counting_too():
    """``flops`` traces blocks on their own (derived) or the whole model (full): both go through
    the same boundary, so the error comes before any count is reported."""
    spec = _spec(layers=[{"at": 0, "block": "shrinking"}])
    for method in ("full", "derived"):
        with pytest.raises(vitlab.VitlabError, match=r"block 0 \(block 'shrinking' from plugin 'old'\) returned 16 tokens"):
            vitlab.analyze(vitlab.build_model(spec, registry=REGISTRY, device="meta"), method=method,
                           second_opinion=False)


def test_a_01_block_fails_at_build_naming_the_plugin():
    with pytest.raises(vitlab.PluginError) as err:
        vitlab.build_model(_spec(block="old_block"), registry=REGISTRY)
    assert str(err.value) == ("block 'old_block' from plugin 'old' has forward(x), the vitlab 0.1 API; since API 2 "
                              "it is forward(x, state): see docs/migration.md")


def test_a_01_attention_fails_at_the_first_forward_naming_the_plugin():
    model = vitlab.build_model(_spec(attention="old_cosine"), registry=REGISTRY, seed=0)
    with pytest.raises(vitlab.PluginError) as err:
        model(IMAGES)
    msg = str(err.value)
    assert msg.startswith("attention 'old_cosine' from plugin 'old' failed with TypeError: 'ForwardState' object is "
                          "not callable; it follows the vitlab 0.1 API")
    assert msg.endswith("see docs/migration.md") and "\n" not in msg


def test_the_cli_says_it_in_one_line(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("extends: vit_tiny_patch16_224\nname: old\ndepth: 2\nattention: old_cosine\n")
    with vitlab.use_registry(REGISTRY):
        line = one_error(invoke_cli("build", recipe))
    assert line.startswith("error: attention 'old_cosine' from plugin 'old' failed with TypeError")
    assert "internal error" not in line and line.endswith("docs/migration.md")


def test_builtin_token_changes_pass_the_check():
    """PiT's pooling transitions change the tokens and return matching states."""
    spec = vitlab.load_spec("pit_ti_like")
    model = vitlab.build_model(spec, device="meta")
    tokens, state = model.forward_tokens(torch.zeros(1, 3, *spec.img_hw, device="meta"))
    assert tokens.shape[1] == state.num_tokens == 1 + 7 * 7 and state.grid == (7, 7)
