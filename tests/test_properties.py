"""Property-based tests (hypothesis): any valid spec works, any invalid input is refused cleanly.

Valid specs are drawn over every registered component (plugins included when installed) with
their boolean params flipped at random; invalid inputs are valid recipes with one field, name or
key mangled, and arbitrary text as a YAML file.
"""
from __future__ import annotations

import typing

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import vitlab
from vitlab.cli import cli, load_commands
from vitlab.component import KINDS

from conftest import repo_registry  # noqa: E402

# Built-ins plus the repository's plugins (rope2d, conv_stem, linear, window), not whatever
# happens to be installed: every component the project ships is drawn.
REGISTRY = repo_registry()
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
EXAMPLES = {"valid": 0, "rejected by a component's own constraints": 0, "invalid": 0, "yaml": 0}
DRAWN: set[tuple[str, str]] = set()


@pytest.fixture(autouse=True)
def _repo_registry():
    with vitlab.use_registry(REGISTRY):
        yield


def _bool_params(info) -> list[str]:
    return [k for k, f in info.cls.Params.model_fields.items() if f.annotation is bool]


@st.composite
def selections(draw, kind: str):
    info = REGISTRY.get(kind, draw(st.sampled_from(REGISTRY.names(kind))))
    params = {k: draw(st.booleans()) for k in _bool_params(info)}
    return {"name": info.name, "params": params}


@st.composite
def valid_recipes(draw):
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8]))
    patch = draw(st.sampled_from([4, 8, 16]))
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    recipe = {
        "name": "prop",
        "img_size": [patch * rows, patch * cols],
        "patch_size": patch,
        "embed_dim": heads * head_dim,
        "num_heads": heads,
        "depth": draw(st.integers(1, 2)),
        "mlp_ratio": draw(st.sampled_from([1.0, 2.0, 4.0])),
        "num_classes": draw(st.sampled_from([0, 3])),
        "class_token": draw(st.booleans()),
        "reg_tokens": draw(st.integers(0, 2)),
        "pre_norm": draw(st.booleans()),
        "final_norm": draw(st.booleans()),
    }
    for kind in KINDS:
        recipe[kind] = draw(selections(kind))
    return recipe


def _load_or_reject(recipe):
    try:
        spec = vitlab.load_spec(recipe)
    except vitlab.SpecError:
        EXAMPLES["rejected by a component's own constraints"] += 1
        assume(False)
    DRAWN.update((kind, spec.selection(kind).name) for kind in KINDS)
    return spec  # a combination a component's own constraints refuse (e.g. a plugin's window size)


@settings(max_examples=40, **SETTINGS)
@given(valid_recipes())
def test_valid_specs_build_run_and_round_trip(tmp_path_factory, recipe):
    spec = _load_or_reject(recipe)
    EXAMPLES["valid"] += 1
    assert vitlab.load_spec(yaml.safe_load(vitlab.dump_spec(spec))) == spec
    assert vitlab.load_spec(vitlab.dump_spec(spec)) == spec  # the dumped text itself
    model = vitlab.build_model(spec, seed=0).eval()
    x = torch.randn(2, spec.in_chans, *spec.img_hw)
    with torch.no_grad():
        out = model(x)
    ctx = model.ctx
    keeps_tokens = type(model.pool).keeps_tokens
    width = spec.num_classes or spec.embed_dim
    assert out.shape == ((2, ctx.num_tokens, width) if keeps_tokens else (2, width))
    assert torch.isfinite(out).all()
    # save -> load rebuilds the same model: same spec, same outputs
    path = vitlab.save(model, tmp_path_factory.mktemp("ckpt") / "m.safetensors")
    loaded = vitlab.load(path).eval()
    assert loaded.spec == spec
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


JUNK = st.one_of(
    st.text(max_size=8), st.integers(-5, 0), st.floats(allow_nan=True), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
BASE = {"name": "t", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 3}


@st.composite
def invalid_recipes(draw):
    recipe = dict(BASE)
    how = draw(st.sampled_from(["field", "unknown_key", "component_name", "param", "param_value", "selection"]))
    if how == "field":
        recipe[draw(st.sampled_from(sorted(vitlab.ViTSpec.model_fields)))] = draw(JUNK)
    elif how == "unknown_key":
        recipe[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in vitlab.ViTSpec.model_fields))] = draw(JUNK)
    elif how == "component_name":
        recipe[draw(st.sampled_from(KINDS))] = {"name": draw(st.text(max_size=10))}
    elif how == "param":
        kind = draw(st.sampled_from(KINDS))
        recipe[kind] = {"name": REGISTRY.names(kind)[0], "params": {draw(st.text(min_size=1, max_size=8)): draw(JUNK)}}
    elif how == "param_value":
        kind = draw(st.sampled_from(KINDS))
        info = REGISTRY.get(kind, draw(st.sampled_from(REGISTRY.names(kind))))
        fields = sorted(info.cls.Params.model_fields)
        assume(fields)
        recipe[kind] = {"name": info.name, "params": {draw(st.sampled_from(fields)): draw(JUNK)}}
    else:
        recipe[draw(st.sampled_from(KINDS))] = draw(JUNK)
    return recipe


@settings(max_examples=150, **SETTINGS)
@given(invalid_recipes())
def test_invalid_input_raises_only_spec_error(recipe):
    EXAMPLES["invalid"] += 1
    try:
        vitlab.load_spec(recipe)
    except vitlab.SpecError as exc:
        assert exc.problems and all(str(p) for p in exc.problems)
    # a mangling that happens to stay valid (e.g. a new name) is fine: no other exception escaped


@settings(max_examples=60, **SETTINGS)
@given(st.text(max_size=80))
def test_mangled_yaml_files_raise_spec_error(tmp_path_factory, text):
    EXAMPLES["yaml"] += 1
    path = tmp_path_factory.mktemp("y") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        vitlab.load_spec(path)
    except vitlab.SpecError as exc:
        assert str(path) in str(exc)


@settings(max_examples=25, **SETTINGS)
@given(invalid_recipes())
def test_cli_answers_bad_recipes_with_exit_2_and_error_lines(tmp_path_factory, recipe):
    load_commands()
    path = tmp_path_factory.mktemp("c") / "bad.yaml"
    try:
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    except yaml.YAMLError:
        assume(False)
    try:
        vitlab.load_spec(path)
        assume(False)  # still valid: nothing to check here
    except vitlab.SpecError as exc:
        expected_lines = len(exc.problems)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == expected_lines and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in result.output


def test_report_example_counts(capsys):
    """Prints how many examples the properties above ran (for the closing note), and checks that
    valid examples reached most registered components (a filter that rejected all plugin
    components would otherwise pass unnoticed)."""
    with capsys.disabled():
        print(f"\nhypothesis examples run: {EXAMPLES}; components drawn in valid specs: {len(DRAWN)} "
              f"of {len(REGISTRY.components())}")
    if EXAMPLES["valid"] >= 40:
        assert len(DRAWN) >= 0.8 * len(REGISTRY.components()), sorted(set((i.kind, i.name) for i in REGISTRY) - DRAWN)
