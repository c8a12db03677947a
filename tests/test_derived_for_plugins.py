"""Derived counts equal full ones for a plugin that follows the docs and never heard of ``acts_after``.

Before, a CPVT-style generator after block 0 was counted 12 times by ``flops --method derived``
(1,262,475,456) and not at all by ``compare`` (1,258,411,200, "+0.00 %"). The reference is a closed
form: ViT-Ti's count (equal to fvcore on timm's model, tests/test_timm_parity.py) plus the one
depthwise 3 x 3 convolution over the 14 x 14 grid, 196 x 192 x 9 multiply-adds.
"""
from __future__ import annotations

import pytest

import vitlab
from vitlab.analysis import analyze
from vitlab.analysis.compare import expand, parse_sweep, run

from conftest import load_test_plugin

REGISTRY = vitlab.make_plugin_manager(entry_points=False, plugins=[("peg", load_test_plugin("peg_after_block.py"))])[1]
VIT_TI = 1_258_411_200
PEG = 196 * 192 * 9


@pytest.fixture(autouse=True)
def _with_the_plugin():
    with vitlab.use_registry(REGISTRY):
        yield


@pytest.mark.parametrize("at_block", [0, 5])
def test_full_and_derived_agree_with_the_closed_form(at_block):
    spec = vitlab.load_spec("vit_tiny_patch16_224", overrides={"pos_embed": {"name": "peg_after_test",
                                                                            "params": {"at_block": at_block}}})
    full, derived = analyze(spec, method="full"), analyze(spec, method="derived")
    assert full.flops == VIT_TI + PEG
    assert derived.flops == full.flops and derived.by_kind == full.by_kind


def test_compare_shares_no_piece_it_should_not():
    """One sweep: learned, the generator after block 0 and after block 5; every row its full count."""
    variants = expand(["vit_tiny_patch16_224"], [parse_sweep("pos_embed={name: learned},{name: peg_after_test, "
                                                           "params: {at_block: 0}},{name: peg_after_test, "
                                                           "params: {at_block: 5}}")])
    sweep = [v.spec for v in variants]
    reports = run(variants)  # one piece cache for the three
    assert [r.derived for r in reports] == [True, True, True]
    assert [r.flops for r in reports] == [analyze(spec, method="full").flops for spec in sweep]
    assert reports[1].flops == reports[2].flops == VIT_TI + PEG and reports[0].flops < reports[1].flops
