"""The registry and plugins, through the real entry-point machinery.

Each test writes a distribution (module + ``.dist-info`` with ``entry_points.txt``) into a
temporary directory on ``sys.path``; ``importlib.metadata`` discovers it like an installed one.
``only_test_entry_points`` hides any other installed ``vitlab`` plugins from these tests.
"""
from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

import vitlab
import vitlab.plugins
from vitlab import PluginError
from vitlab.component import KIND_BASES, KINDS

from conftest import TEST_DIST, TEST_EP, TEST_MODULE, TINY, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")


def test_builtin_registry_contents(builtin_registry):
    # The components the built-in modules declare, listed independently of the registry.
    import vitlab.components as builtins

    declared = {(cls.kind, cls.name) for mod in builtins.MODULES for cls in mod.COMPONENTS}
    registered = {(i.kind, i.name) for i in builtin_registry.components()}
    assert registered == declared
    assert {i.provider for i in builtin_registry.components()} == {"vitlab"}
    assert {k for k, _ in registered} == set(KINDS)
    for info in builtin_registry.components():
        assert issubclass(info.cls, KIND_BASES[info.kind])
        assert info.description, f"{info.kind} '{info.name}' has no docstring line"
        info.params_model.model_validate(info.default_params())  # defaults round-trip


def test_registry_lookup_errors(builtin_registry):
    with pytest.raises(KeyError, match="did you mean 'mhsa'"):
        builtin_registry.get("attention", "mhas")
    with pytest.raises(KeyError, match="component kind"):
        builtin_registry.components("attn")
    assert ("attention", "mhsa") in builtin_registry
    assert ("attention", "nope") not in builtin_registry


def test_entry_point_plugin_registers_component(plugin_dist, only_test_entry_points):
    plugin_dist("good_attention.py")
    assert [ep.name for ep in only_test_entry_points()] == [TEST_EP]
    pm, reg = vitlab.make_plugin_manager()
    info = reg.get("attention", "cosine_test")
    assert info.provider == TEST_DIST
    assert info.cls.__module__ == TEST_MODULE
    assert pm.get_plugin(TEST_EP) is not None
    [plugin] = reg.plugins
    assert (plugin.name, plugin.distribution, plugin.version) == (TEST_EP, TEST_DIST, "0.1")
    assert plugin.components == [("attention", "cosine_test")]
    # built-ins are still there, still provided by vitlab
    assert reg.get("attention", "mhsa").provider == "vitlab"

    # a spec selecting the plugin's component validates (params too) and builds
    spec = vitlab.load_spec({**TINY, "attention": {"name": "cosine_test", "params": {"scale": 5}}}, registry=reg)
    assert spec.attention.params == {"scale": 5.0}
    with pytest.raises(vitlab.SpecError, match="scale"):
        vitlab.load_spec({**TINY, "attention": {"name": "cosine_test", "params": {"scale": -1}}}, registry=reg)
    model = vitlab.build_model(spec, registry=reg, seed=0).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert type(model.blocks[0].attn).name == "cosine_test"
    # ...and through the process-wide registry as well
    with vitlab.use_registry(reg):
        assert vitlab.build_model({**TINY, "attention": "cosine_test"}).blocks[1].attn.scale == 10.0
    # the default (built-in only) registry does not know it
    with pytest.raises(vitlab.SpecError, match="cosine_test"):
        vitlab.load_spec({**TINY, "attention": "cosine_test"})


def test_cli_lists_plugin_component_in_fresh_process(plugin_dist, run_python):
    site = plugin_dist("good_attention.py")
    # skip whatever other vitlab plugins are installed, so only ours can make a difference
    others = {ep.name for ep in importlib.metadata.entry_points(group="vitlab")
              if ep.dist is None or ep.dist.name != TEST_DIST}
    env = subprocess_env(PYTHONPATH=str(site), VITLAB_DISABLE_PLUGINS=",".join(sorted(others)))
    res = run_python("-m", "vitlab", "components", "attention", "--json", env=env)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["cosine_test"]["provider"] == TEST_DIST
    assert rows["cosine_test"]["params"] == {"scale": 10.0}
    assert rows["mhsa"]["provider"] == "vitlab"


def test_broken_plugin_names_distribution_and_entry_point(plugin_dist, only_test_entry_points):
    plugin_dist("broken_import.py")
    with pytest.raises(PluginError) as err:
        vitlab.make_plugin_manager()
    msg = str(err.value)
    assert f"'{TEST_EP}'" in msg and f"'{TEST_DIST}'" in msg
    assert "ImportError" in msg and "vitlab_testplugin_missing_dependency" in msg
    assert "VITLAB_DISABLE_PLUGINS" in msg  # tells the user how to get going again
    # non-strict: recorded, the rest still loads
    _, reg = vitlab.make_plugin_manager(strict=False)
    [failure] = reg.failures
    assert (failure.name, failure.distribution) == (TEST_EP, TEST_DIST)
    assert ("attention", "mhsa") in reg


@pytest.mark.parametrize("value", ["1", TEST_EP, TEST_DIST, f"other, {TEST_EP}"])
def test_disable_env_skips_plugin(plugin_dist, only_test_entry_points, monkeypatch, value):
    plugin_dist("broken_import.py")  # would raise if it were loaded
    monkeypatch.setenv("VITLAB_DISABLE_PLUGINS", value)
    _, reg = vitlab.make_plugin_manager()
    assert reg.plugins == [] and reg.failures == []
    assert ("attention", "mhsa") in reg


def test_disable_env_other_name_does_not_skip(plugin_dist, only_test_entry_points, monkeypatch):
    plugin_dist("good_attention.py")
    monkeypatch.setenv("VITLAB_DISABLE_PLUGINS", "someotherplugin")
    _, reg = vitlab.make_plugin_manager()
    assert ("attention", "cosine_test") in reg


def test_duplicate_name_names_both_providers(plugin_dist, only_test_entry_points):
    plugin_dist("duplicate_mhsa.py")
    with pytest.raises(PluginError) as err:
        vitlab.make_plugin_manager()
    msg = str(err.value)
    assert "attention 'mhsa'" in msg
    assert "'vitlab'" in msg and f"'{TEST_DIST}'" in msg
    assert "AnotherMhsa" in msg and "MultiHeadSelfAttention" in msg


def test_duplicate_message_names_builtin_first(plugin_dist, only_test_entry_points):
    plugin_dist("duplicate_mhsa.py")
    with pytest.raises(PluginError, match=f"by 'vitlab' .* and by '{TEST_DIST}'"):
        vitlab.make_plugin_manager()


def test_non_component_registration_fails(plugin_dist, only_test_entry_points):
    plugin_dist("non_component.py")
    with pytest.raises(PluginError, match=f"'{TEST_DIST}'.*not a component class"):
        vitlab.make_plugin_manager()


def test_misspelled_hook_fails_at_startup(plugin_dist, only_test_entry_points):
    plugin_dist("misspelled_hook.py")
    with pytest.raises(PluginError, match="vitlab_register_component"):
        vitlab.make_plugin_manager()


def test_entry_points_off_ignores_installed_plugins(plugin_dist, only_test_entry_points):
    plugin_dist("broken_import.py")
    _, reg = vitlab.make_plugin_manager(entry_points=False)
    assert reg.plugins == [] and reg.failures == []


# --- in-process plugins (``plugins=[...]``): the registry's own checks ----------------------


def _plugin(*classes):
    class Plugin:
        @staticmethod
        @vitlab.hookimpl
        def vitlab_register_components(register):
            for c in classes:
                register(c)

    return Plugin


class _Named(vitlab.Pool):
    """A pool with a valid name."""

    name = "first_patch"

    def forward(self, x):
        return x[:, -1]


@pytest.mark.parametrize(
    "bad, match",
    [
        (object, "not a component class"),
        (vitlab.Pool, "invalid name ''"),  # the kind base itself has no name
        (type("BadName", (_Named,), {"name": "First-Patch"}), "invalid name 'First-Patch'"),
        (type("BadKind", (_Named,), {"kind": "head"}), "unknown kind 'head'"),
        (type("BadParams", (_Named,), {"name": "bad_params", "Params": dict}), "not a pydantic model"),
    ],
)
def test_register_rejects_malformed_components(bad, match):
    with pytest.raises(PluginError, match=match):
        vitlab.make_plugin_manager(entry_points=False, plugins=[("mine", _plugin(bad))])


def test_in_process_plugin_and_list_components():
    _, reg = vitlab.make_plugin_manager(entry_points=False, plugins=[("mine", _plugin(_Named))])
    assert reg.get("pool", "first_patch").provider == "mine"
    with vitlab.use_registry(reg):
        assert "first_patch" in [i.name for i in vitlab.list_components("pool")]
    assert "first_patch" not in [i.name for i in vitlab.list_components("pool")]  # restored


def test_in_process_misspelled_hook():
    class Plugin:
        @staticmethod
        @vitlab.hookimpl
        def vitlab_register_componentz(register):
            pass

    with pytest.raises(PluginError, match="unknown hook"):
        vitlab.make_plugin_manager(entry_points=False, plugins=[("typo", Plugin)])


def test_hooks_run_through_pluggy_one_plugin_at_a_time():
    # each plugin's hook is called through pluggy's own call path, narrowed to that plugin: a
    # hook wrapper (which pluggy would run around every other plugin's hook) is refused, alone
    class Wrapper:
        @staticmethod
        @vitlab.hookimpl(wrapper=True)
        def vitlab_register_components(register):
            register(_Named)
            return (yield)

    pm, reg = vitlab.make_plugin_manager(entry_points=False, plugins=[("wraps", Wrapper), ("mine", _plugin(_Named))],
                                         strict=False)
    assert [f.name for f in reg.failures] == ["wraps"]
    assert "vitlab_register_components is a hook wrapper" in reg.failures[0].reason
    assert reg.get("pool", "first_patch").provider == "mine" and pm.get_plugin("wraps") is None
    # what a plugin registers reaches the registry through pluggy's hook caller, as for the built-ins
    assert [i.plugin_name for i in pm.hook.vitlab_register_components.get_hookimpls()] == ["vitlab", "mine"]
