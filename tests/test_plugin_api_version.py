"""The plugin API version: a plugin module declares ``vitlab_api = 2``; an installed plugin that
declares an older one, or none (written for 0.1), fails at load with one warning naming it and
pointing to docs/migration.md, while the others keep working."""
from __future__ import annotations

import re

import pytest
from conftest import PLUGIN_SOURCES, REPO, TEST_DIST, TEST_EP, repo_plugins

import vitlab
from vitlab.hookspecs import VITLAB_API

GOOD = dict(dist=f"{TEST_DIST}-good", module="vitlab_testplugin_good", ep="good")
# good_attention.py as a 0.1 plugin would be: the same module without the declaration
UNDECLARED = re.sub(r"(?m)^vitlab_api = .*$", "", (PLUGIN_SOURCES / "good_attention.py").read_text())


def test_the_api_version_is_two():
    assert VITLAB_API == 2


@pytest.mark.parametrize("declaration, reason", [
    ("", "declares no vitlab_api: it was written for vitlab 0.1; port it and set vitlab_api = 2 (see docs/migration.md)"),
    ("vitlab_api = 1", "targets vitlab_api = 1, this vitlab speaks 2: port it (see docs/migration.md)"),
    ("vitlab_api = '2'", "targets vitlab_api = '2', this vitlab speaks 2: port it (see docs/migration.md)"),
    ("vitlab_api = 3", "targets vitlab_api = 3, newer than this vitlab's 2: upgrade vitlab"),
])
def test_an_installed_plugin_of_another_api_fails_alone_with_one_warning(
        declaration, reason, plugin_dist, only_test_entry_points):
    plugin_dist(UNDECLARED.replace('from vitlab.component import Attention\n',
                                   f'from vitlab.component import Attention\n{declaration}\n'))
    plugin_dist("exp_mlp.py", **GOOD)
    _, reg = vitlab.make_plugin_manager(strict=False)
    [failure] = reg.failures
    assert (failure.name, failure.reason) == (TEST_EP, reason)
    assert ("attention", "cosine_test") not in reg
    assert reg.get("mlp", "exp_mlp").provider == GOOD["dist"]  # the other plugin keeps working
    [line] = reg.warnings()
    assert line == (f"plugin '{TEST_EP}' (distribution '{TEST_DIST}') failed: {reason}; "
                    f"set VITLAB_DISABLE_PLUGINS={TEST_EP} to skip it")
    with pytest.raises(vitlab.PluginError, match=re.escape(reason)):
        vitlab.make_plugin_manager()  # strict loading raises instead


def test_an_in_process_plugin_is_checked_when_it_declares_a_version():
    """Objects handed to ``make_plugin_manager(plugins=...)`` are written against the running
    vitlab (tests, tools); one that declares another version still fails."""
    old = type("Old", (), {"vitlab_api": 1})
    _, reg = vitlab.make_plugin_manager(entry_points=False, plugins=[("old", old)], strict=False)
    assert [f.reason for f in reg.failures] == ["targets vitlab_api = 1, this vitlab speaks 2: port it (see docs/migration.md)"]
    _, reg = vitlab.make_plugin_manager(entry_points=False, plugins=[("plain", type("Plain", (), {}))], strict=False)
    assert reg.failures == []


def test_builtins_shipped_plugins_and_test_plugins_declare_it():
    import vitlab.components

    assert vitlab.components.vitlab_api == VITLAB_API
    sources = [src / module / "__init__.py" for _, module, src in repo_plugins()]
    sources += sorted(PLUGIN_SOURCES.glob("*.py"))
    assert len(sources) >= 3 + 15
    for path in sources:
        assert re.search(r"(?m)^vitlab_api = 2\b", path.read_text()), f"{path.relative_to(REPO)} declares no vitlab_api = 2"


def test_the_scaffold_declares_it():
    assert re.search(r"(?m)^vitlab_api = 2\b", (REPO / "vitlab" / "templates" / "plugin" / "__init__.py.tmpl").read_text())
