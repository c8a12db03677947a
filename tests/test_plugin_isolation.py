"""One broken plugin never stops the rest (issue "Untrusted input v2 and plugin isolation").

Every trigger installs fake distributions through the real entry-point machinery
(``plugin_dist``) next to a well-behaved one, and checks the exact state the lenient registry
ends in, the one warning line, the message a recipe gets when it selects what the broken plugin
(would have) provided, and that strict loading still raises.
"""
from __future__ import annotations

import json
import signal
import sys

import re

import pytest
from pydantic import ConfigDict, Field, ValidationError

import vitlab
import vitlab.plugins
from vitlab import PluginError, SpecError

from conftest import TEST_DIST, TEST_EP, TEST_MODULE, TINY, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")

GOOD_DIST, GOOD_MODULE, GOOD_EP = "vitlab-testplugin-good", "vitlab_testplugin_good", "testplugin_good"
HINT = f"; set VITLAB_DISABLE_PLUGINS={TEST_EP} to skip it"
LABEL = f"plugin '{TEST_EP}' (distribution '{TEST_DIST}')"


@pytest.fixture
def test_eps(monkeypatch):
    """Only the entry points of the test distributions (by module, so that a distribution without
    a Name is kept too); never whatever else is installed."""
    real = vitlab.plugins._entry_points

    def ours():
        return [ep for ep in real() if ep.value.startswith(TEST_MODULE)]

    monkeypatch.setattr(vitlab.plugins, "_entry_points", ours)
    monkeypatch.delenv("VITLAB_DISABLE_PLUGINS", raising=False)
    yield ours
    for name in [m for m in sys.modules if m.startswith(TEST_MODULE)]:
        del sys.modules[name]


@pytest.fixture
def with_good(plugin_dist, test_eps):
    """``with_good(source)``: the plugin under test plus a well-behaved one that must keep working."""

    def make(source: str, **kw):
        plugin_dist("good_attention.py", dist=GOOD_DIST, module=GOOD_MODULE, ep=GOOD_EP)
        return plugin_dist(source, **kw)

    return make


def lenient():
    return vitlab.make_plugin_manager(strict=False)


def assert_only_good_loaded(pm, reg):
    assert [(p.name, p.distribution, p.components) for p in reg.plugins] == [
        (GOOD_EP, GOOD_DIST, [("attention", "cosine_test")])
    ]
    assert reg.get("attention", "cosine_test").provider == GOOD_DIST
    assert pm.get_plugin(GOOD_EP) is not None and pm.get_plugin(TEST_EP) is None
    spec = vitlab.load_spec({**TINY, "attention": "cosine_test"}, registry=reg)
    assert vitlab.build_model(spec, registry=reg).blocks[0].attn.name == "cosine_test"


def known(reg, kind):
    return ", ".join(reg.names(kind))


# --- an import error ----------------------------------------------------------------------------------

IMPORT_REASON = ("import of 'vitlab_testplugin' raised ImportError: "
                 "No module named 'vitlab_testplugin_missing_dependency'")


def test_import_error_is_recorded_and_the_rest_loads(with_good):
    with_good("broken_import.py")
    pm, reg = lenient()
    assert reg.failures == [vitlab.plugins.PluginFailure(TEST_EP, TEST_DIST, IMPORT_REASON, skip=TEST_EP)]
    assert reg.warnings() == [f"{LABEL} failed: {IMPORT_REASON}{HINT}"]
    assert_only_good_loaded(pm, reg)
    # a recipe selecting a name nobody loaded names the plugin that may have provided it, and why
    with pytest.raises(SpecError) as err:
        vitlab.load_spec({**TINY, "attention": "cosine_fancy"}, registry=reg)
    assert str(err.value) == (
        f"attention.name: unknown attention 'cosine_fancy'; {LABEL} that may provide it failed to load: "
        f"{IMPORT_REASON}; did you mean 'cosine_test'? known: {known(reg, 'attention')}"
    )
    with pytest.raises(PluginError) as err:
        vitlab.make_plugin_manager()
    assert str(err.value) == f"{LABEL} failed: {IMPORT_REASON}{HINT}"


def test_warning_lines_are_printed_once_by_report_failures(with_good, monkeypatch):
    with_good("broken_import.py")
    monkeypatch.setattr(vitlab.plugins, "_ECHO", None)
    monkeypatch.setattr(vitlab.plugins, "_REGISTRY", None)
    lines: list[str] = []
    vitlab.plugins.report_failures(lines.append)
    assert lines == []  # nothing loaded yet, and report_failures does not load plugins itself
    reg = vitlab.get_registry()  # lenient: the process registry never raises for a plugin
    expected = [f"warning: {LABEL} failed: {IMPORT_REASON}{HINT}"]
    assert lines == expected
    assert vitlab.get_registry() is reg
    vitlab.plugins.report_failures(lines.append)  # a second call prints nothing new
    assert lines == expected
    assert ("attention", "cosine_test") in reg


# --- a distribution without a Name ----------------------------------------------------------------------

def _drop_name(site):
    meta = site / f"{TEST_DIST.replace('-', '_')}-0.1.dist-info" / "METADATA"
    meta.write_text("Metadata-Version: 2.1\nVersion: 0.1\n")


def test_distribution_without_name_is_a_failure_not_a_crash(with_good):
    _drop_name(with_good("good_attention.py", dist=TEST_DIST))
    pm, reg = lenient()
    folder = f"{TEST_DIST.replace('-', '_')}-0.1.dist-info"
    reason = "its distribution has no Name in its METADATA (a broken installation: reinstall or remove it)"
    assert reg.failures == [vitlab.plugins.PluginFailure(TEST_EP, folder, reason, skip=TEST_EP)]
    assert reg.warnings() == [f"plugin '{TEST_EP}' (distribution '{folder}') failed: {reason}{HINT}"]
    assert_only_good_loaded(pm, reg)
    with pytest.raises(PluginError, match="has no Name in its METADATA"):
        vitlab.make_plugin_manager()


@pytest.mark.parametrize("strict", [True, False])
def test_distribution_without_name_can_be_disabled_by_entry_point(with_good, monkeypatch, strict):
    _drop_name(with_good("broken_import.py"))
    monkeypatch.setenv("VITLAB_DISABLE_PLUGINS", TEST_EP)
    pm, reg = vitlab.make_plugin_manager(strict=strict)
    assert reg.failures == [] and reg.warnings() == []
    assert [(d.name, d.distribution) for d in reg.disabled] == [(TEST_EP, f"{TEST_DIST.replace('-', '_')}-0.1.dist-info")]
    assert_only_good_loaded(pm, reg)


# --- a component name registered by two plugins ------------------------------------------------------

A_DIST, A_MODULE, A_EP = "vitlab-testplugin-a", "vitlab_testplugin_a", "twin_a"
B_DIST, B_MODULE, B_EP = "vitlab-testplugin-b", "vitlab_testplugin_b", "twin_b"


def test_duplicate_name_is_ambiguous_and_both_plugins_stay_loaded(plugin_dist, test_eps):
    plugin_dist("twin_attention.py", dist=A_DIST, module=A_MODULE, ep=A_EP)
    plugin_dist("twin_and_pool.py", dist=B_DIST, module=B_MODULE, ep=B_EP)
    pm, reg = lenient()
    assert reg.failures == []
    assert [(p.name, p.components) for p in reg.plugins] == [
        (A_EP, [("attention", "twin")]), (B_EP, [("attention", "twin"), ("pool", "twin_pool")]),
    ]
    assert pm.get_plugin(A_EP) is not None and pm.get_plugin(B_EP) is not None
    assert ("attention", "twin") not in reg and "twin" not in reg.names("attention")
    assert reg.get("pool", "twin_pool").provider == B_DIST  # the rest of the plugin works
    vitlab.build_model(vitlab.load_spec({**TINY, "pool": "twin_pool"}, registry=reg), registry=reg)
    origin_a = f"'{A_DIST}' ({A_MODULE}.TwinAttention)"
    origin_b = f"'{B_DIST}' ({B_MODULE}.OtherTwin)"
    with pytest.raises(SpecError) as err:
        vitlab.load_spec({**TINY, "attention": "twin"}, registry=reg)
    assert str(err.value) == (
        f"attention.name: attention 'twin' is ambiguous: registered by {origin_a} and by {origin_b}; "
        f"set VITLAB_DISABLE_PLUGINS={A_DIST} or VITLAB_DISABLE_PLUGINS={B_DIST} to use the other"
    )
    assert reg.warnings() == [
        f"attention 'twin' is registered by {origin_a} and by {origin_b}; a recipe that selects it fails "
        f"until you set VITLAB_DISABLE_PLUGINS to one of {A_DIST}, {B_DIST}"
    ]
    # strict loading refuses the clash, naming both
    with pytest.raises(PluginError) as err:
        vitlab.make_plugin_manager()
    assert str(err.value) == (f"plugin '{B_EP}' (distribution '{B_DIST}') failed: attention 'twin' is registered "
                              f"twice: by {origin_a} and by {origin_b}; set VITLAB_DISABLE_PLUGINS={B_EP} to skip it")


def test_disabling_one_of_two_clashing_plugins_resolves_the_name(plugin_dist, test_eps, monkeypatch):
    plugin_dist("twin_attention.py", dist=A_DIST, module=A_MODULE, ep=A_EP)
    plugin_dist("twin_and_pool.py", dist=B_DIST, module=B_MODULE, ep=B_EP)
    monkeypatch.setenv("VITLAB_DISABLE_PLUGINS", A_DIST)
    _, reg = lenient()
    assert reg.get("attention", "twin").provider == B_DIST and reg.warnings() == []


def test_reusing_a_builtin_name_fails_only_that_plugin(with_good):
    with_good("duplicate_mhsa.py")
    pm, reg = lenient()
    reason = (f"attention 'mhsa' is registered twice: by 'vitlab' "
              f"(vitlab.components.attention.MultiHeadSelfAttention) and by '{TEST_DIST}' "
              f"({TEST_MODULE}.AnotherMhsa) (a plugin cannot replace a built-in)")
    assert reg.failures == [vitlab.plugins.PluginFailure(TEST_EP, TEST_DIST, reason, (("attention", "mhsa"),), True, TEST_EP)]
    assert reg.get("attention", "mhsa").provider == "vitlab"  # every default recipe still works
    assert_only_good_loaded(pm, reg)


# --- FLOP rules for the same operator from two plugins -----------------------------------------------

def test_same_operator_from_two_plugins_is_not_fatal_and_each_counts_its_own(plugin_dist, test_eps):
    plugin_dist("exp_mlp.py", dist=A_DIST, module=A_MODULE, ep=A_EP)  # aten::expm1 = 7, first by name
    plugin_dist("exp_pool.py", dist=B_DIST, module=B_MODULE, ep=B_EP)  # aten::expm1 free
    for strict in (True, False):
        _, reg = vitlab.make_plugin_manager(strict=strict)
        assert reg.failures == [] and reg.op_rules["aten::expm1"].provider == A_DIST
        assert [r.provider for r in reg.op_declarations["aten::expm1"]] == [A_DIST, B_DIST]
        assert reg.warnings() == [
            f"FLOPs of aten::expm1 are declared by '{A_DIST}' and by '{B_DIST}': "
            f"each counts it inside its own components, '{A_DIST}' everywhere else"
        ]
    spec = vitlab.load_spec({**TINY, "depth": 2, "mlp": "exp_mlp", "pool": "exp_pool"}, registry=reg)
    report = vitlab.analyze(vitlab.build_model(spec, registry=reg, device="meta"), second_opinion=False)
    # two blocks' exp inside exp_mlp counted by its plugin (7 each); the pool's exp is free by its own
    assert report.by_operator["aten::expm1"] == 14
    assert report.free_ops["aten::expm1"] == 1
    assert "aten::expm1" not in report.unsupported


# --- sys.exit() and KeyboardInterrupt at import -------------------------------------------------------

@pytest.mark.parametrize("source, raised", [
    ("exit_at_import.py", "SystemExit (exit code None)"),
    ("interrupt_at_import.py", "KeyboardInterrupt: raised by the plugin, not by the user"),
])
def test_base_exceptions_at_import_are_contained(with_good, source, raised):
    with_good(source)
    pm, reg = lenient()
    reason = f"import of 'vitlab_testplugin' raised {raised}"
    assert reg.warnings() == [f"{LABEL} failed: {reason}{HINT}"]
    assert_only_good_loaded(pm, reg)
    with pytest.raises(PluginError) as err:
        vitlab.make_plugin_manager()
    assert str(err.value) == f"{LABEL} failed: {reason}{HINT}"


def test_a_real_ctrl_c_while_plugins_load_still_stops_vitlab(with_good):
    with_good("sigint_at_import.py")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        lenient()
    assert signal.getsignal(signal.SIGINT) is before  # the watch is undone


def _site_env(site, tmp_path):
    """A fresh interpreter that sees the test distributions and no other installed plugin."""
    import importlib.metadata

    others = {ep.name for ep in importlib.metadata.entry_points(group="vitlab")
              if not ep.value.startswith(TEST_MODULE)}
    return subprocess_env(PYTHONPATH=str(site), VITLAB_DISABLE_PLUGINS=",".join(sorted(others)) or "none")


def test_validate_of_an_invalid_recipe_fails_despite_sys_exit_in_a_plugin(plugin_dist, run_python, tmp_path):
    site = plugin_dist("exit_at_import.py")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(json.dumps({**TINY, "depth": 0}))
    env = _site_env(site, tmp_path)
    res = run_python("-m", "vitlab", "validate", str(recipe), env=env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "depth" in res.stderr and "Traceback" not in res.stderr
    # the CLI wiring: report_failures before the command runs prints the one warning line first
    code = ("import sys, click; from vitlab.plugins import report_failures; "
            "report_failures(lambda line: click.echo(line, err=True)); "
            "from vitlab.cli import main; sys.argv = ['vitlab', 'validate', sys.argv[1]]; main()")
    res = run_python("-c", code, str(recipe), env=env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert lines[0] == (f"warning: {LABEL} failed: import of 'vitlab_testplugin' raised SystemExit (exit code None)"
                        f"{HINT}")
    assert len(lines) == 2 and lines[1].startswith("error: ") and "depth" in lines[1]


# --- hooks that raise, unknown hooks, contract violations -----------------------------------------------

def test_a_hook_that_raises_leaves_nothing_behind(with_good):
    with_good("hook_raises.py")
    pm, reg = lenient()
    reason = "vitlab_register_components raised RuntimeError: the plugin's own bug"
    assert reg.failures == [
        vitlab.plugins.PluginFailure(TEST_EP, TEST_DIST, reason, (("attention", "half_registered"),), False, TEST_EP)
    ]
    assert ("attention", "half_registered") not in reg
    assert_only_good_loaded(pm, reg)
    with pytest.raises(SpecError) as err:
        vitlab.load_spec({**TINY, "attention": "half_registered"}, registry=reg)
    assert str(err.value) == (
        f"attention.name: unknown attention 'half_registered'; {LABEL} that provides it failed to load: "
        f"{reason}; known: {known(reg, 'attention')}"
    )


def test_misspelled_hook_is_that_plugins_failure_when_lenient(with_good):
    with_good("misspelled_hook.py")
    pm, reg = lenient()
    [failure] = reg.failures
    assert failure.reason == ("unknown hook 'vitlab_register_component'; did you mean 'vitlab_register_components'? "
                              "known: vitlab_flop_handles, vitlab_register_components, vitlab_timm_equivalents")
    assert_only_good_loaded(pm, reg)


def test_typo_in_params_annotation_fails_at_registration(with_good):
    with_good("typo_annotation.py")
    pm, reg = lenient()
    [failure] = reg.failures
    assert failure.reason.startswith("registered TypoAttention, whose Params is not fully defined: ")
    assert "boool" in failure.reason
    assert failure.components == (("attention", "typo_attention"),) and failure.complete
    assert_only_good_loaded(pm, reg)
    with pytest.raises(SpecError, match=r"attention 'typo_attention'; plugin .* that provides it failed to load: "
                                        r"registered TypoAttention, whose Params is not fully defined"):
        vitlab.load_spec({**TINY, "attention": "typo_attention"}, registry=reg)


def _one(cls):
    class Plugin:
        @staticmethod
        @vitlab.hookimpl
        def vitlab_register_components(register):
            register(cls)

    return Plugin


def _pool(cls_name: str, name: str, params: type) -> type:
    return type(cls_name, (vitlab.Pool,), {"name": name, "Params": params, "forward": lambda self, x: x[:, 0]})


class _Ok(vitlab.Pool):
    """A valid pool."""

    name = "ok_pool"

    def forward(self, x):
        return x[:, 0]


class _NoDefault(vitlab.Pool.Params):
    size: int


class _BadDefault(vitlab.Pool.Params):
    rate: float = Field(-1.0, gt=0.0)  # pydantic does not validate defaults by itself


class _NoSchema(vitlab.Pool.Params):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    kernel: type(len) = len  # a builtin function: no JSON schema for it


@pytest.mark.parametrize("params, reason", [
    (_NoDefault, "registered BadPool, whose Params has no default for size (every field needs one: "
                 "a bare name in a recipe means default params)"),
    (_BadDefault, "registered BadPool, whose Params defaults do not validate: rate: Input should be greater than 0"),
    (_NoSchema, "registered BadPool, whose Params has no JSON schema: PydanticInvalidForJsonSchema: "),
], ids=["no-default", "bad-default", "no-schema"])
def test_params_contract_is_checked_at_registration(params, reason):
    bad = _one(_pool("BadPool", "bad_pool", params))
    _, reg = vitlab.make_plugin_manager(entry_points=False, plugins=[("bad", bad), ("ok", _one(_Ok))], strict=False)
    [failure] = reg.failures
    assert failure.name == "bad" and failure.reason.startswith(reason), failure.reason
    assert failure.message() == f"plugin 'bad' failed: {failure.reason}"  # in-process: no env hint
    assert ("pool", "bad_pool") not in reg and reg.get("pool", "ok_pool").provider == "ok"
    with pytest.raises(PluginError) as err:
        vitlab.make_plugin_manager(entry_points=False, plugins=[("bad", bad)])
    assert str(err.value).startswith(f"plugin 'bad' failed: {reason}")


# --- plain bool made strict ----------------------------------------------------------------------------

def test_plain_bool_params_are_strict(plugin_dist, test_eps):
    plugin_dist("plain_bool.py")
    _, reg = vitlab.make_plugin_manager()
    params = reg.get("pool", "flag_pool").cls.Params
    assert params().model_dump() == {"flag": False, "maybe": None, "many": (True, False), "loose": False, "count": 1}
    assert params.model_fields["flag"].description == "a plain bool"
    assert params.__qualname__ == "FlagPool.Params" and params.model_json_schema()["title"] == "Params"
    assert params.model_json_schema()["properties"]["flag"] == {
        "default": False, "description": "a plain bool", "title": "Flag", "type": "boolean"}
    for field in ("flag", "maybe"):
        for ok in (True, False):
            assert getattr(params.model_validate({field: ok}), field) is ok
        for bad in ("no", 1, "true", 0):
            with pytest.raises(ValidationError, match="valid boolean"):
                params.model_validate({field: bad})
    assert params.model_validate({"maybe": None}).maybe is None
    with pytest.raises(ValidationError, match="valid boolean"):
        params.model_validate({"many": [True, "no"]})
    assert params.model_validate({"loose": 1}).loose is True  # Field(strict=False) is kept
    with pytest.raises(ValidationError, match="greater than 0"):
        params.model_validate({"count": 0})
    with pytest.raises(ValidationError, match="extra"):
        params.model_validate({"flga": True})
    with pytest.raises(SpecError) as err:
        vitlab.load_spec({**TINY, "pool": {"name": "flag_pool", "params": {"flag": "no"}}}, registry=reg)
    assert str(err.value) == "pool.params.flag: input should be a valid boolean (got 'no')"
    spec = vitlab.load_spec({**TINY, "pool": {"name": "flag_pool", "params": {"flag": True}}}, registry=reg)
    assert spec.pool.params["flag"] is True


def test_builtin_plain_bools_are_strict_too(builtin_registry):
    """Built-ins register through the same hook, so a built-in's plain ``bool`` is strict as well."""
    for info in builtin_registry.components():
        for name, field in info.params_model.model_fields.items():
            if field.annotation is bool:
                with pytest.raises(ValidationError, match="valid boolean"):
                    info.params_model.model_validate({name: "no"})


# --- vitlab plugins: every plugin's true state ------------------------------------------------------------

def test_plugins_command_shows_every_state(plugin_dist, test_eps, run_cli, monkeypatch):
    import vitlab.cli.plugin_cmds  # noqa: F401  (registers the commands)

    plugin_dist("broken_import.py")
    plugin_dist("twin_attention.py", dist=A_DIST, module=A_MODULE, ep=A_EP)
    plugin_dist("twin_and_pool.py", dist=B_DIST, module=B_MODULE, ep=B_EP)
    plugin_dist("good_attention.py", dist=GOOD_DIST, module=GOOD_MODULE, ep=GOOD_EP)
    env = {"VITLAB_DISABLE_PLUGINS": GOOD_EP}
    res = run_cli("plugins", "--json", env=env)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [(p["name"], p["ambiguous"]) for p in report["plugins"]] == [
        (A_EP, [{"kind": "attention", "name": "twin"}]), (B_EP, [{"kind": "attention", "name": "twin"}]),
    ]
    assert report["failures"] == [{"name": TEST_EP, "distribution": TEST_DIST, "reason": IMPORT_REASON}]
    assert [d["name"] for d in report["disabled"]] == [GOOD_EP]
    assert report["ambiguous"] == [{"kind": "attention", "name": "twin", "providers": [A_DIST, B_DIST]}]
    assert report["warnings"][0] == f"{LABEL} failed: {IMPORT_REASON}{HINT}" and len(report["warnings"]) == 2
    res = run_cli("plugins", env=env)
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    assert "attention twin (ambiguous)" in text and "pool twin_pool" in text
    assert f"ambiguous: attention 'twin' is registered by {A_DIST} and by {B_DIST}" in text
    assert f"disabled by VITLAB_DISABLE_PLUGINS: {GOOD_DIST} ({GOOD_EP})" in text
    assert "plugins that failed to load" in text and "vitlab_testplugin_missing_dependency" in text


def test_a_component_of_a_disabled_plugin_names_the_disabled_plugin_first(with_good, monkeypatch):
    """Before, the message said "provided by no installed plugin", or blamed another broken plugin."""
    with_good("broken_import.py")
    monkeypatch.setenv("VITLAB_DISABLE_PLUGINS", GOOD_EP)
    _, reg = vitlab.make_plugin_manager(strict=False)
    message = reg.unknown_message("attention", "cosine_test")
    disabled = f"VITLAB_DISABLE_PLUGINS disables plugin '{GOOD_EP}', which may provide it"
    assert disabled in message and "provided by no installed plugin" not in message
    assert message.index(disabled) < message.index("failed to load")  # the likelier reason first


def test_ambiguous_components_are_listed_with_both_providers(plugin_dist, test_eps):
    """Before, a name two plugins register vanished from ``vitlab components`` (table and JSON)."""
    import json

    from conftest import invoke_cli

    plugin_dist("twin_attention.py", dist=A_DIST, module=A_MODULE, ep=A_EP)
    plugin_dist("twin_and_pool.py", dist=B_DIST, module=B_MODULE, ep=B_EP)
    _, reg = lenient()
    with vitlab.use_registry(reg):
        listed = json.loads(invoke_cli("components", "attention", "--json").stdout)
        table = invoke_cli("components", "attention").stdout
    (twin,) = [c for c in listed if c["name"] == "twin"]
    assert twin["ambiguous"] is True and twin["providers"] == [A_DIST, B_DIST]
    assert "ambiguous:" in table


def test_components_show_default_factories_not_pydantic_internals():
    """``hybrid``'s backbone has a default factory: it was listed as backbone=PydanticUndefined."""
    import json

    from conftest import invoke_cli

    (hybrid,) = [c for c in json.loads(invoke_cli("components", "patch_embed", "--json").stdout) if c["name"] == "hybrid"]
    assert hybrid["params"]["backbone"]["name"] == "resnetv2_stem"
    table = invoke_cli("components", "patch_embed").stdout
    assert "PydanticUndefined" not in table and "backbone={name: resnetv2_stem" in table.replace("\n", "")


def test_the_python_api_warns_about_a_failed_plugin(with_good, monkeypatch):
    """The CLI prints ``warning:`` lines; a script calling ``load_registry`` was told nothing."""
    import vitlab.plugins as plugins

    with_good("broken_import.py")
    monkeypatch.setattr(plugins, "_REGISTRY", None)
    monkeypatch.setattr(plugins, "_ECHO", None)
    with pytest.warns(plugins.PluginWarning, match=re.escape(f"{LABEL} failed: import of 'vitlab_testplugin' raised")):
        registry = plugins.load_registry()
    assert registry.get("attention", "cosine_test").provider == GOOD_DIST  # the rest works
