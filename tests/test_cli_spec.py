"""``vitlab components | validate | show | build`` (click's CliRunner, in-process, built-in
components only), plus one real ``python -m vitlab validate`` in a fresh interpreter."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import vitlab
from vitlab import load_spec

from conftest import REPO, one_error, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")

PLAIN_RECIPES = sorted(str(p) for p in (REPO / "recipes").glob("*.yaml"))  # those needing no plugin


def _timm_params(name: str, **kwargs) -> int:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, pretrained=False, **kwargs).parameters())


_one_error = one_error


# --- components -------------------------------------------------------------------------------


def test_components_lists_every_builtin(run_cli, builtin_registry):
    res = run_cli("components")
    assert res.exit_code == 0, res.output
    for info in builtin_registry.components():
        assert info.name in res.stdout
    for kind in vitlab.KINDS:
        assert kind in res.stdout


def test_components_json_of_one_kind(run_cli):
    res = run_cli("components", "attention", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {r["kind"] for r in rows} == {"attention"}
    mhsa = next(r for r in rows if r["name"] == "mhsa")
    assert mhsa["provider"] == "vitlab"
    assert mhsa["params"]["qk_norm"] is False and "qk_norm" in mhsa["schema"]["properties"]


def test_components_unknown_kind(run_cli):
    line = _one_error(run_cli("components", "attn"))
    assert "attn" in line and "did you mean 'attention'" in line


# --- validate ---------------------------------------------------------------------------------


def test_validate_all_bundled(run_cli):
    res = run_cli("validate", *PLAIN_RECIPES)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("ok: ") == len(PLAIN_RECIPES) and res.stderr == ""


def test_validate_by_name_with_set(run_cli):
    res = run_cli("validate", "vit_tiny_patch16_224", "--set", "depth=6", "--set", "attention.params.qk_norm=true")
    assert res.exit_code == 0, res.output
    line = _one_error(run_cli("validate", "vit_tiny_patch16_224", "--set", "detph=6"))
    assert "detph" in line and "did you mean 'depth'" in line
    line = _one_error(run_cli("validate", "vit_tiny_patch16_224", "--set", "depth"))
    assert "KEY=VALUE" in line


def test_validate_needs_a_recipe(run_cli):
    res = run_cli("validate")
    assert res.exit_code == 2 and "Traceback" not in res.output  # click's usage error


# --- show -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [[], ["pos_embed.name=sincos2d", "depth=3"]])
def test_show_prints_resolved_yaml(run_cli, overrides):
    args = [a for o in overrides for a in ("--set", o)]
    res = run_cli("show", "vit_tiny_avgpool_reg4", *args)
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.stdout)
    expected = load_spec("vit_tiny_avgpool_reg4", overrides=overrides)
    assert load_spec(shown) == expected
    assert shown["reg_tokens"] == 4 and shown["pool"]["name"] == "avg"  # extends resolved
    # every field, defaults filled, but the stages' transition, which means nothing without stages
    assert set(shown) == set(vitlab.ViTSpec.model_fields) - {"transition"}


def test_show_missing_recipe(run_cli):
    assert "nope.yaml" in _one_error(run_cli("show", "nope.yaml"))


# --- build ------------------------------------------------------------------------------------


def test_build_reports_timm_parameter_count_and_shapes(run_cli):
    res = run_cli("build", "vit_tiny_patch16_224")
    assert res.exit_code == 0, res.output
    assert f"{_timm_params('vit_tiny_patch16_224'):,}" in res.stdout
    n = 1 + (224 // 16) ** 2
    assert f"(2, {n}, 192)" in res.stdout and "(2, 1000)" in res.stdout and f"{n}" in res.stdout
    res = run_cli("build", "vit_tiny_patch16_224", "--set", "depth=6", "-b", "3")
    assert res.exit_code == 0, res.output
    assert f"{_timm_params('vit_tiny_patch16_224', depth=6):,}" in res.stdout
    assert "(3, 1000)" in res.stdout


def test_build_on_cpu_runs_a_real_forward(run_cli):
    res = run_cli("build", "vit_tiny_patch16_224", "--device", "cpu", "--set", "depth=1", "--set", "img_size=64")
    assert res.exit_code == 0, res.output
    assert "(2, 17, 192)" in res.stdout


def test_build_errors(run_cli):
    assert "--device" in _one_error(run_cli("build", "vit_tiny_patch16_224", "--device", "nodevice"))
    assert "img_size" in _one_error(run_cli("build", "vit_tiny_patch16_224", "--set", "img_size=100"))


# --- the real command -------------------------------------------------------------------------


def test_python_m_vitlab_validate(run_python, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: vit_tiny_patch16_224\nattention: {name: mhas}\n")
    res = run_python("-m", "vitlab", "validate", str(REPO / "recipes" / "vit_tiny_patch16_224.yaml"), str(bad),
                     env=subprocess_env(VITLAB_DISABLE_PLUGINS="1"))
    assert res.returncode == 2, res.stderr
    assert res.stdout.startswith("ok: ") and res.stdout.count("\n") == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: attention.name: ")
    assert "did you mean 'mhsa'" in lines[0] and "Traceback" not in res.stderr
