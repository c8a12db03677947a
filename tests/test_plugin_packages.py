"""The plugin packages in ``plugins/`` as installed distributions (issue 5).

``dev.py test`` (and so ``.ci/run``) pip-installs every ``plugins/*/`` editable before pytest runs;
these tests use the real entry points of that installation. Each package's own behaviour is tested
in ``plugins/<dist>/tests/``; here: installation, discovery, the CLI listings, the recipes under
``recipes/plugins/`` (build, forward, parameters, FLOPs), how a recipe fails without its plugin,
and the plugins used together.
"""
from __future__ import annotations

import importlib.metadata
import json
import sys
import tomllib

import pytest
import torch

import vitlab
from vitlab import SpecError
from vitlab.maps import attention_maps
from vitlab.errors import did_you_mean

from conftest import REPO, TINY, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")

PLUGINS = {  # distribution -> (entry point, module, components)
    "vitlab-rope": ("rope", "vitlab_rope", {("pos_embed", "rope2d")}),
    "vitlab-convstem": ("convstem", "vitlab_convstem", {("patch_embed", "conv_stem")}),
    "vitlab-efficient-attention": (
        "efficient_attention", "vitlab_efficient_attention", {("attention", "linear")},
    ),
}
PLUGIN_RECIPES = sorted((REPO / "recipes" / "plugins").glob("*.yaml"))
# recipe -> the plugin it needs and the component it selects
NEEDS = {
    "vit_tiny_rope2d": ("vitlab-rope", "pos_embed", "rope2d"),
    "vit_tiny_rope2d_qknorm": ("vitlab-rope", "pos_embed", "rope2d"),
    "vit_tiny_convstem": ("vitlab-convstem", "patch_embed", "conv_stem"),
    "vit_tiny_linear_attn": ("vitlab-efficient-attention", "attention", "linear"),
}


@pytest.fixture
def installed(monkeypatch):
    """The registry of built-ins plus every installed plugin (no VITLAB_DISABLE_PLUGINS), made the
    process-wide one (the shared conftest otherwise pins tests to built-ins only)."""
    monkeypatch.delenv("VITLAB_DISABLE_PLUGINS", raising=False)
    _, registry = vitlab.make_plugin_manager()
    with vitlab.use_registry(registry):
        yield registry


def test_every_plugin_package_is_installed_from_this_repository():
    assert sorted(p.parent.name for p in (REPO / "plugins").glob("*/pyproject.toml")) == sorted(PLUGINS)
    for dist, (ep_name, module, _) in PLUGINS.items():
        meta = tomllib.loads((REPO / "plugins" / dist / "pyproject.toml").read_text())
        assert meta["project"]["name"] == dist
        assert meta["project"]["entry-points"]["vitlab"] == {ep_name: module}
        assert any(d.startswith("vitlab") for d in meta["project"]["dependencies"])
        assert (REPO / "plugins" / dist / "README.md").is_file()
        installed = importlib.metadata.distribution(dist)  # fails if dev.py did not install it
        assert installed.version == meta["project"]["version"]
        [ep] = [e for e in installed.entry_points if e.group == "vitlab"]
        assert (ep.name, ep.value) == (ep_name, module)
    pytest_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "plugins" in pytest_cfg["testpaths"]  # their own tests run with the suite


def test_registry_lists_the_plugins_and_their_components(installed):
    for dist, (ep_name, _, components) in PLUGINS.items():
        [info] = [p for p in installed.plugins if p.distribution == dist]
        assert info.name == ep_name and set(info.components) == components
        for kind, name in components:
            assert installed.get(kind, name).provider == dist
    assert not installed.failures


def test_components_and_plugins_commands(installed, run_cli):
    import vitlab.cli.plugin_cmds  # noqa: F401  (registers the commands)

    res = run_cli("components", "--json")
    assert res.exit_code == 0, res.output
    listed = {(c["kind"], c["name"]): c["provider"] for c in json.loads(res.stdout)}
    for dist, (_, _, components) in PLUGINS.items():
        for kc in components:
            assert listed[kc] == dist
    res = run_cli("plugins")
    assert res.exit_code == 0, res.output
    for dist, (ep_name, module, components) in PLUGINS.items():
        assert dist in res.stdout and f"{ep_name} = {module}" in res.stdout
        for kind, name in components:
            assert f"{kind} {name}" in res.stdout
    report = json.loads(run_cli("plugins", "--json").stdout)
    got = {p["distribution"]: (p["version"], {(c["kind"], c["name"]) for c in p["components"]}) for p in report["plugins"]}
    for dist, (_, _, components) in PLUGINS.items():
        assert got[dist] == ("0.1.0", components)
    assert report["failures"] == []


def test_plugins_command_shows_disabled_and_failed_plugins(run_cli, plugin_dist):
    """A broken plugin does not stop the listing: it is shown with its reason."""
    import vitlab.cli.plugin_cmds  # noqa: F401

    plugin_dist("broken_import.py")
    res = run_cli("plugins", env={"VITLAB_DISABLE_PLUGINS": "vitlab-convstem"})
    assert res.exit_code == 0, res.output
    assert "plugins that failed to load" in res.stdout and "vitlab-testplugin" in res.stdout
    assert "disabled by VITLAB_DISABLE_PLUGINS: vitlab-convstem (convstem)" in res.stdout
    report = json.loads(run_cli("plugins", "--json", env={"VITLAB_DISABLE_PLUGINS": "vitlab-convstem"}).stdout)
    [failure] = report["failures"]
    assert failure["distribution"] == "vitlab-testplugin" and "raised" in failure["reason"]
    assert "vitlab-convstem" not in {p["distribution"] for p in report["plugins"]}


def test_every_plugin_recipe_is_covered():
    assert sorted(p.stem for p in PLUGIN_RECIPES) == sorted(NEEDS)


@pytest.mark.parametrize("recipe", PLUGIN_RECIPES, ids=lambda p: p.stem)
def test_plugin_recipe_builds_runs_and_is_reported(recipe, installed):
    dist, kind, name = NEEDS[recipe.stem]
    spec = vitlab.load_spec(recipe)
    assert spec.selection(kind).name == name and spec.name == recipe.stem
    report = vitlab.analyze(spec, second_opinion=False)
    # the same recipe with the built-in counterpart of the plugin's component
    builtin = {"patch_embed": "conv", "pos_embed": "none", "attention": "mhsa"}[kind]
    baseline = vitlab.analyze({**spec.to_dict(), kind: builtin}, second_opinion=False)
    model = vitlab.build_model(spec, seed=0).eval()
    assert report.params == sum(p.numel() for p in model.parameters()) > 0
    assert report.flops > 0 and not report.unsupported, report.unsupported
    assert report.tokens == baseline.tokens
    if kind == "attention":  # local / linear attention costs less than softmax attention at 197 tokens
        assert report.by_kind["attention"] < baseline.by_kind["attention"]
        assert report.params == baseline.params  # same projections
    if kind == "patch_embed":  # a deeper stem: more FLOPs than one patchify conv
        assert report.by_kind["patch_embed"] > baseline.by_kind["patch_embed"]
    if kind == "pos_embed":  # no weights, and the rotations are elementwise (free): costs what 'none' costs
        assert (report.params, report.flops) == (baseline.params, baseline.flops)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("recipe", PLUGIN_RECIPES, ids=lambda p: p.stem)
def test_without_the_plugin_the_recipe_fails_with_a_clear_message(recipe, monkeypatch):
    dist, kind, name = NEEDS[recipe.stem]
    monkeypatch.setenv("VITLAB_DISABLE_PLUGINS", dist)
    _, registry = vitlab.make_plugin_manager()
    assert (kind, name) not in registry
    with pytest.raises(SpecError) as err:
        vitlab.load_spec(recipe, registry=registry)
    msg, known = str(err.value), ", ".join(registry.names(kind))
    assert f"{kind}.name: unknown {kind} '{name}'" in msg and msg.endswith(f" known: {known}")
    if not did_you_mean(name, registry.names(kind)):  # 'conv_stem' gets "did you mean 'conv'?" instead
        # the disabled plugin is named as the likely provider (its code never ran, so not for sure)
        assert f"unknown {kind} '{name}'; VITLAB_DISABLE_PLUGINS disables plugin" in msg
        assert f"which may provide it; known: {known}" in msg


def test_without_rope_the_cli_says_so_instead_of_an_import_error(run_python):
    res = run_python(
        "-m", "vitlab", "validate", "recipes/plugins/vit_tiny_rope2d.yaml",
        env=subprocess_env(VITLAB_DISABLE_PLUGINS="rope"),  # the entry point's name works too
    )
    assert res.returncode == 2, res.stderr
    builtins = ", ".join(vitlab.make_plugin_manager(entry_points=False)[1].names("pos_embed"))
    assert res.stderr.strip() == (
        "error: recipes/plugins/vit_tiny_rope2d.yaml: pos_embed.name: unknown pos_embed 'rope2d'; "
        f"VITLAB_DISABLE_PLUGINS disables plugin 'rope', which may provide it; did you mean 'rope'? known: {builtins}"
    )
    assert "rope2d" not in builtins
    assert "Traceback" not in res.stderr and "ImportError" not in res.stderr


@pytest.mark.parametrize("attention", ["window", "linear"])
def test_plugins_compose_rope_with_efficient_attention_and_qk_norm(attention, installed):
    """rope2d acts inside another plugin's attention (and the built-in window attention) without
    either knowing of the other."""
    params = {"qk_norm": True, **({"window_size": 2} if attention == "window" else {})}
    spec = vitlab.load_spec({**TINY, "reg_tokens": 1, "pos_embed": "rope2d", "norm": "rmsnorm",
                             "attention": {"name": attention, "params": params}})
    model = vitlab.build_model(spec, seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real = model.pos_embed.qk_transform

    def spy(grid):
        fn = real(grid)

        def wrapped(q, k):
            calls.append(q.shape)
            return fn(q, k)
        return wrapped

    model.pos_embed.qk_transform = spy
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and len(calls) == spec.depth
    if attention == "window":  # the recorded (dense, masked) path agrees with the fused windows
        attention_maps(model, x)
        for block in model.blocks:
            block.attn.record_maps = True
        with torch.no_grad():
            torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


def test_conv_stem_feeds_the_other_plugins(installed):
    spec = vitlab.load_spec({**TINY, "patch_embed": {"name": "conv_stem", "params": {"channels": [8, 16, 32]}},
                             "pos_embed": "rope2d", "attention": {"name": "window", "params": {"window_size": 2}}})
    with torch.no_grad():
        assert vitlab.build_model(spec, seed=0).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert sys.modules["vitlab_convstem"].__version__ == "0.1.0"
