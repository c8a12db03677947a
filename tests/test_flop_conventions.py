"""FLOP-handle conventions a plugin can follow without surprises: the guide's plugin raises no overlap
warning, ``free=`` reasons reach every report format, and "the first declaration" means built-ins,
then entry points sorted by distribution name."""
from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, TINY, invoke_cli
from test_docs import blocks, run_block

import vitlab
from vitlab.analysis import analyze

REASON = "elementwise"  # tests/plugins/exp_pool.py's reason for declaring aten::expm1 free


@pytest.fixture(scope="module")
def cosine_registry():
    [block] = [b for b in blocks("python", REPO / "docs" / "plugins.md") if "class CosineAttention" in b.code]
    return vitlab.make_plugin_manager(entry_points=False, plugins=[("cosine", run_block(block))])[1]


def test_the_guides_plugin_overlaps_nothing(cosine_registry):
    """Before, the guide declared aten::linalg_vector_norm with a count, which vitlab declares free:
    every command, even on built-in recipes, printed an overlap warning. It declares nothing now:
    vitlab counts its aten::exp free too (Swin v2's cosine attention)."""
    assert cosine_registry.warnings() == [] and cosine_registry.op_conflicts() == {}
    spec = vitlab.load_spec({**TINY, "attention": "cosine"}, registry=cosine_registry)
    report = analyze(spec)
    assert report.unsupported == {} and report.free_why["aten::exp"].startswith("exponential")
    assert report.free_why["aten::linalg_vector_norm"].startswith("vector norm")  # vitlab's own reason


def test_free_reasons_reach_table_json_and_markdown():
    import importlib.util

    loaded = importlib.util.spec_from_file_location("exp_pool_inline", REPO / "tests" / "plugins" / "exp_pool.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    registry = vitlab.make_plugin_manager(entry_points=False, plugins=[("exp_pool", module)])[1]
    with vitlab.use_registry(registry):
        path = REPO / "recipes" / "vit_tiny_patch16_224.yaml"
        args = ["flops", str(path), "--set", "pool.name=exp_pool", "--set", "depth=1"]
        table = invoke_cli(*args).stdout
        md = invoke_cli(*args, "--format", "md").stdout
        data = json.loads(invoke_cli(*args, "--format", "json").stdout)
    assert data["unsupported"] == {} and data["free_why"]["aten::expm1"] == REASON
    assert f"| aten::expm1 | 1 | {REASON} |" in md and "declared free by a plugin" not in md
    assert f"│ aten::expm1 │ 1 │ {REASON}" in " ".join(table.split())


A = ("vitlab-flops-a", "vitlab_flops_order_a", "exp_a")  # module names of their own: nothing cached elsewhere
B = ("vitlab-flops-b", "vitlab_flops_order_b", "exp_b")
DECLARES = """
import vitlab
vitlab_api = 2

@vitlab.hookimpl
def vitlab_flop_handles(register):
    register("aten::expm1", flops=lambda inputs, outputs: {n})
"""


def test_the_first_declaration_is_by_distribution_name(plugin_dist, monkeypatch):
    import vitlab.plugins

    real = vitlab.plugins._entry_points
    monkeypatch.setattr(vitlab.plugins, "_entry_points",
                        lambda: [ep for ep in real() if ep.value.startswith("vitlab_flops_order")])
    monkeypatch.delenv("VITLAB_DISABLE_PLUGINS", raising=False)
    plugin_dist(DECLARES.format(n=2), dist=B[0], module=B[1], ep=B[2])  # installed first
    plugin_dist(DECLARES.format(n=1), dist=A[0], module=A[1], ep=A[2])
    _, registry = vitlab.make_plugin_manager(strict=False)
    assert [r.provider for r in registry.op_declarations["aten::expm1"]] == [A[0], B[0]]
    assert registry.op_rules["aten::expm1"].provider == A[0]
    for module in (A[1], B[1]):
        sys.modules.pop(module, None)
