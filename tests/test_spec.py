"""Invalid recipes: each raises ``SpecError`` naming the field path (or the file), and
``vitlab validate FILE`` prints exactly one ``error:`` line and exits 2, never a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import vitlab
from vitlab import SpecError, ViTSpec, dump_spec, load_spec

from conftest import TINY

pytestmark = pytest.mark.usefixtures("single_thread")


def _tiny_with(**fields):
    return {**TINY, **fields}


# (id, recipe mapping, field path named, fragments the message must contain)
FIELD_CASES = [
    ("depth_string", _tiny_with(depth="twelve"), "depth", ["twelve"]),
    ("class_token_string", _tiny_with(class_token="maybe"), "class_token", ["maybe", "boolean"]),
    ("depth_float", _tiny_with(depth=2.5), "depth", ["2.5"]),
    ("unknown_attention", _tiny_with(attention={"name": "mhas"}), "attention.name", ["mhas", "did you mean 'mhsa'"]),
    ("unknown_pos_embed_bare", _tiny_with(pos_embed="sincos"), "pos_embed.name", ["sincos", "did you mean 'sincos2d'"]),
    ("unknown_param", _tiny_with(attention={"name": "mhsa", "params": {"qk_nrom": True}}),
     "attention.params.qk_nrom", ["did you mean 'qk_norm'"]),
    ("bad_param_value", _tiny_with(mlp={"name": "mlp", "params": {"act": "gelu2"}}), "mlp.params.act", ["gelu2"]),
    ("typo_selection_key", _tiny_with(attention={"name": "mhsa", "parms": {}}), "attention.parms", ["did you mean 'params'"]),
    ("typo_top_level", {**{k: v for k, v in TINY.items() if k != "depth"}, "depht": 2}, "depht", ["did you mean 'depth'"]),
    ("width_not_divisible_by_heads", _tiny_with(num_heads=3), "num_heads", ["32", "3"]),
    ("token_pool_without_class_token", _tiny_with(class_token=False), "pool", ["class token"]),
    ("embed_dim_zero", _tiny_with(embed_dim=0), "embed_dim", ["0"]),
    ("patch_size_negative", _tiny_with(patch_size=-1), "patch_size", ["-1"]),
    ("img_size_three_values", _tiny_with(img_size=[32, 32, 3]), "img_size", []),
    ("depth_zero", _tiny_with(depth=0), "depth", []),
    ("num_classes_negative", _tiny_with(num_classes=-1), "num_classes", []),
    ("drop_rate_one", _tiny_with(drop_path_rate=1.0), "drop_path_rate", []),
    ("img_not_divisible_by_patch", _tiny_with(img_size=30), "img_size", ["30", "8"]),
    ("sincos_width_not_div_4", _tiny_with(embed_dim=30, pos_embed="sincos2d"), "pos_embed", ["divisible by 4", "30"]),
]


@pytest.mark.parametrize("data, loc, fragments", [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_invalid_field_names_path(data, loc, fragments):
    with pytest.raises(SpecError) as err:
        load_spec(data)
    assert [p.loc for p in err.value.problems] == [loc]
    msg = str(err.value)
    assert msg.startswith(f"{loc}: ")
    for f in fragments:
        assert f in msg


@pytest.mark.parametrize("data, loc, fragments", [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_invalid_field_cli_one_error_line(tmp_path, run_cli, data, loc, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    res = run_cli("validate", path)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and f"{path}: {loc}: " in lines[0]
    assert "Traceback" not in res.stderr + res.stdout


def test_several_problems_reported_together(tmp_path, run_cli):
    data = _tiny_with(depth="x", class_token="maybe", attention={"name": "mhas"})
    with pytest.raises(SpecError) as err:
        load_spec(data)
    assert sorted(p.loc for p in err.value.problems) == ["attention.name", "class_token", "depth"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    res = run_cli("validate", path)
    assert res.exit_code == 2
    assert len(res.stderr.splitlines()) == 3
    assert all(line.startswith("error: ") for line in res.stderr.splitlines())


# --- file-level problems ---------------------------------------------------------------------

# (id, {file name: text}, file to load, fragments)
FILE_CASES = [
    ("bad_yaml", {"r.yaml": "depth: [1, 2\nname: x\n"}, "r.yaml", ["invalid YAML", "line"]),
    ("bad_yaml_tab_indent", {"r.yaml": "attention:\n\tname: mhsa\n"}, "r.yaml", ["invalid YAML"]),
    ("empty_file", {"r.yaml": ""}, "r.yaml", ["empty"]),
    ("whitespace_file", {"r.yaml": "\n   \n"}, "r.yaml", ["empty"]),
    ("only_comments", {"r.yaml": "# nothing here\n# at all\n"}, "r.yaml", ["empty", "comments"]),
    ("top_level_list", {"r.yaml": "- depth: 2\n- name: x\n"}, "r.yaml", ["mapping", "list"]),
    ("top_level_scalar", {"r.yaml": "vit\n"}, "r.yaml", ["mapping", "str"]),
    ("bad_json", {"r.json": '{"depth": 2,}'}, "r.json", ["invalid JSON", "line 1"]),
    ("missing_extends_target", {"r.yaml": "extends: nope.yaml\ndepth: 2\n"}, "r.yaml", ["extends", "nope.yaml", "not found"]),
    ("extends_not_a_string", {"r.yaml": "extends: [a, b]\n"}, "r.yaml", ["extends"]),
    ("extends_cycle", {"a.yaml": "extends: b.yaml\ndepth: 2\n", "b.yaml": "extends: a.yaml\ndepth: 3\n"},
     "a.yaml", ["cycle", "a.yaml", "b.yaml"]),
    ("extends_self", {"a.yaml": "extends: a.yaml\n"}, "a.yaml", ["cycle"]),
    ("missing_file", {}, "does_not_exist.yaml", ["does_not_exist.yaml", "not found"]),
    ("not_utf8", {"r.yaml": b"name: \xff\xfe\n"}, "r.yaml", ["UTF-8"]),
]


def _write(tmp_path: Path, files: dict) -> None:
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize("files, target, fragments", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_invalid_file(tmp_path, files, target, fragments):
    _write(tmp_path, files)
    path = tmp_path / target
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert len(err.value.problems) == 1 and "\n" not in msg
    assert target in msg  # the file is named
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize("files, target, fragments", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_invalid_file_cli_one_error_line(tmp_path, run_cli, files, target, fragments):
    _write(tmp_path, files)
    res = run_cli("validate", tmp_path / target)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and target in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stdout == ""


def test_validate_mixed_good_and_bad(tmp_path, run_cli):
    (tmp_path / "bad.yaml").write_text("depth: twelve\n")
    res = run_cli("validate", "vit_tiny_patch16_224", tmp_path / "bad.yaml", tmp_path / "missing.yaml")
    assert res.exit_code == 2
    assert "ok: vit_tiny_patch16_224" in res.stdout
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "depth" in lines[0] and "missing.yaml" in lines[1]


# --- the spec object --------------------------------------------------------------------------


def test_spec_defaults_are_vit_b16():
    # ViT-B/16 of Dosovitskiy et al. (2021), Table 1: width 768, depth 12, 12 heads, MLP 3072.
    s = ViTSpec.model_validate({}, context={"registry": vitlab.load_registry()})
    assert s == load_spec({}) and s.registry is vitlab.load_registry()
    assert (s.embed_dim, s.depth, s.num_heads, s.mlp_hidden_dim, s.patch_hw, s.img_hw) == (
        768, 12, 12, 3072, (16, 16), (224, 224))
    assert s.num_tokens == 1 + 14 * 14
    # defaults of the selections are filled in, so a dumped spec is complete
    assert s.attention.params["qkv_bias"] is True


def test_spec_validation_needs_a_registry():
    with pytest.raises(TypeError, match="validated against a component registry"):
        ViTSpec()  # no registry in the validation context: nothing global is read instead


def test_spec_from_yaml_reads_text_and_refuses_extends():
    spec = load_spec(_tiny_with())
    assert ViTSpec.from_yaml(dump_spec(spec), registry=vitlab.load_registry()) == spec
    with pytest.raises(SpecError, match="^extends: recipe text cannot extend"):
        ViTSpec.from_yaml("extends: vit_tiny_patch16_224\ndepth: 2\n", registry=vitlab.load_registry())


def test_spec_is_frozen_and_rectangular_sizes():
    s = load_spec(_tiny_with(img_size=[32, 48], patch_size=[8, 16]))
    assert s.img_hw == (32, 48) and s.patch_hw == (8, 16)
    assert s.build_context().grid_size == (4, 3)
    with pytest.raises(Exception):
        s.depth = 3  # type: ignore[misc]


def test_spec_error_is_value_error_and_vitlab_error():
    with pytest.raises(ValueError):
        load_spec(_tiny_with(depth=0))
    assert issubclass(SpecError, vitlab.VitlabError) and SpecError.exit_code == 2


def test_json_schema_of_params_is_valid():
    jsonschema = pytest.importorskip("jsonschema")
    for info in vitlab.list_components():
        schema = info.params_schema()
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.validate(info.default_params(), schema)
        json.dumps(schema)


# --- numbers that once slipped through (each case names the field that must be blamed) -------

INF = float("inf")
BUG_CASES = [
    # mlp_ratio: .inf escapes validation as OverflowError in ViTSpec.mlp_hidden_dim (int(inf))
    ("mlp_ratio_inf", _tiny_with(mlp_ratio=INF), "mlp_ratio"),
    # int(32 * 0.01) == 0: a 0-wide MLP is built without complaint
    ("mlp_hidden_dim_zero", _tiny_with(mlp_ratio=0.01), "mlp_ratio"),
    # lax float: a bool / a string pass for a number, unlike the strict int and bool fields
    ("mlp_ratio_bool", _tiny_with(mlp_ratio=True), "mlp_ratio"),
    ("mlp_ratio_string", _tiny_with(mlp_ratio="4"), "mlp_ratio"),
    # sincos2d temperature <= 0 gives a NaN position table (and NaN logits)
    ("sincos_temperature_zero", _tiny_with(pos_embed={"name": "sincos2d", "params": {"temperature": 0}}),
     "pos_embed.params.temperature"),
    ("sincos_temperature_negative", _tiny_with(pos_embed={"name": "sincos2d", "params": {"temperature": -1}}),
     "pos_embed.params.temperature"),
    # non-finite floats pass gt=0 checks: layer scale inf gives non-finite outputs
    ("init_values_inf", _tiny_with(block={"name": "prenorm", "params": {"init_values": INF}}), "block.params.init_values"),
]


@pytest.mark.parametrize("data, loc", [c[1:] for c in BUG_CASES], ids=[c[0] for c in BUG_CASES])
def test_invalid_numbers_rejected(data, loc):
    with pytest.raises(SpecError) as err:
        load_spec(data)
    assert any(p.loc.startswith(loc) for p in err.value.problems), str(err.value)


def test_cli_validate_infinite_mlp_ratio(tmp_path, run_cli):
    path = tmp_path / "inf.yaml"
    path.write_text("extends: vit_tiny_patch16_224\nmlp_ratio: .inf\n")
    res = run_cli("validate", path)
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert "mlp_ratio" in res.stderr and "internal error" not in res.stderr
