"""``vitlab schema``: the JSON Schema of the recipe format, checked with the ``jsonschema`` package."""
from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

import vitlab
from vitlab.component import KINDS
from vitlab.schema import DRAFT, recipe_schema

from conftest import REPO

RECIPE_FILES = sorted(p for p in (REPO / "recipes").rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


@pytest.fixture(scope="module")
def installed_registry():
    """Built-ins plus every installed plugin (the repository's plugins/ packages under dev.py)."""
    mp = pytest.MonkeyPatch()
    mp.delenv("VITLAB_DISABLE_PLUGINS", raising=False)
    try:
        return vitlab.make_plugin_manager()[1]
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def exported(installed_registry, tmp_path_factory):
    """The schema as ``vitlab schema -o FILE`` writes it, read back from the file."""
    from click.testing import CliRunner

    import vitlab.cli.plugin_cmds  # noqa: F401  (registers the commands)
    from vitlab.cli import cli

    path = tmp_path_factory.mktemp("schema") / "vitlab-recipe.schema.json"
    with vitlab.use_registry(installed_registry):
        res = CliRunner().invoke(cli, ["schema", "-o", str(path)])
    assert res.exit_code == 0, res.output
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def validator(exported):
    jsonschema.Draft202012Validator.check_schema(exported)
    return jsonschema.Draft202012Validator(exported)


def _errors(validator, data) -> list[str]:
    return [e.message for e in validator.iter_errors(data)]


def test_schema_is_draft_2020_12_with_every_registered_component(exported, installed_registry):
    assert exported["$schema"] == DRAFT
    for kind in KINDS:
        branches = exported["properties"][kind]["oneOf"]
        assert branches[0]["enum"] == installed_registry.names(kind)  # the bare-name form
        named = {b["properties"]["name"]["const"]: b for b in branches if "name" in b.get("properties", {})}
        assert sorted(named) == installed_registry.names(kind)
        for name, branch in named.items():
            assert branch["additionalProperties"] is False and branch["required"] == ["name"]
            params = installed_registry.get(kind, name).params_schema()
            params.pop("$defs", None)
            assert set(branch["properties"]["params"]["properties"]) == set(params["properties"])
    # global fields come from ViTSpec
    spec_fields = set(vitlab.ViTSpec.model_json_schema()["properties"])
    assert set(exported["properties"]) == spec_fields | {"extends"}
    # the plugins' components are in it (the packages in plugins/ are installed for the tests)
    assert "rope2d" in exported["properties"]["pos_embed"]["oneOf"][0]["enum"]
    assert {"linear", "window"} <= set(exported["properties"]["attention"]["oneOf"][0]["enum"])


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_bundled_recipe_validates_against_the_exported_schema(path, validator):
    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    assert _errors(validator, data) == []


def test_every_component_default_validates(validator, installed_registry):
    for info in installed_registry.components():
        for form in (info.name, {"name": info.name}, {"name": info.name, "params": info.default_params()}):
            assert _errors(validator, {info.kind: form}) == [], (info.kind, form)


@pytest.mark.parametrize("data", [
    {"attention": "mhas"},  # unknown name, bare form
    {"pos_embed": {"name": "rope3d"}},  # unknown name
    {"attention": {"name": "mhsa", "params": {"qk_nrom": True}}},  # unknown param
    {"attention": {"name": "window", "params": {"window_size": "seven"}}},  # wrong type
    {"attention": {"name": "linear", "params": {"eps": "tiny"}}},  # wrong type (plugin params)
    {"patch_embed": {"name": "conv_stem", "params": {"channels": [24, -1]}}},  # constraint of a plugin param
    {"attention": {"name": "mhsa", "params": {"attn_drop": 1.5}}},  # out of range
    {"attention": {"name": "mhsa", "extra": 1}},  # unknown key of a selection
    {"depht": 12},  # unknown global field
    {"img_size": [224]},  # not a pair
    {"attention": {"params": {"qk_norm": True}}},  # params without a name need extends
    {"extends": ""},
    {"layers": [{"attention": "mhsa"}]},  # an override without the blocks it applies to
    {"layers": [{"at": "two", "attention": "mhsa"}]},  # not indices
    {"layers": [{"at": 1, "attention": "mhas"}]},  # unknown name inside a layer
    {"stages": [{"depth": 1, "embed_dim": 8}]},  # no num_heads
    {"stages": [{"depth": 1, "embed_dim": 8, "num_heads": 2, "transition": "pool"}]},  # unknown transition
])
def test_invalid_recipes_do_not_validate(validator, data):
    assert _errors(validator, data)


def test_forms_recipes_may_use(validator):
    assert _errors(validator, {"extends": "vit_tiny_patch16_224", "attention": {"params": {"qk_norm": True}}}) == []
    assert _errors(validator, {"pos_embed": "sincos2d", "img_size": [224, 192], "block": {"name": "prenorm"}}) == []


def test_schema_follows_the_registry(builtin_registry, run_cli):
    """Built-ins only: the plugins' names are absent; stdout gives the same document as the file."""
    schema = recipe_schema(builtin_registry)
    assert "rope2d" not in schema["properties"]["pos_embed"]["oneOf"][0]["enum"]
    validator = jsonschema.Draft202012Validator(schema)
    assert _errors(validator, {"pos_embed": "rope2d"})
    import vitlab.cli.plugin_cmds  # noqa: F401

    res = run_cli("schema")  # conftest pins the process-wide registry to built-ins
    assert res.exit_code == 0 and json.loads(res.stdout) == schema


def test_every_recipe_shown_validates_against_the_schema(validator, installed_registry):
    """The documented round trip ``vitlab show`` -> ``vitlab schema``: every bundled recipe, plugin
    recipes included, dumped with every field, is a valid recipe for the schema (before, ``layers``
    entries were dumped with ``norm: null`` that the schema rejects)."""
    from vitlab.recipes import bundled_recipes, dump_spec

    checked = 0
    with vitlab.use_registry(installed_registry):
        for name in bundled_recipes():
            try:
                spec = vitlab.load_spec(name, registry=installed_registry)
            except vitlab.SpecError:  # a plugin recipe whose plugin is not installed here
                assert name.startswith("plugins/"), name
                continue
            shown = yaml.safe_load(dump_spec(spec))
            assert _errors(validator, shown) == [], name
            checked += 1
    assert checked >= len([r for r in RECIPE_FILES if "plugins" not in r.parts])
