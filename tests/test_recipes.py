"""Bundled recipes, parameter counts against independent references, overrides, ``extends``,
dump/load round trips and JSON recipes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from vitlab import SpecError, build_model, dump_spec, load_spec
from vitlab.recipes import bundled_recipes, recipes_dir

from conftest import REPO, TINY, repo_registry

pytestmark = pytest.mark.usefixtures("single_thread")

RECIPE_FILES = sorted(p for p in (REPO / "recipes").rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
RECIPE_NAMES = [p.relative_to(REPO / "recipes").with_suffix("").as_posix() for p in RECIPE_FILES]
TIMM_STANDARD = [
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_huge_patch14_224",
]


def test_bundled_recipes_are_the_repository_files():
    assert RECIPE_NAMES, "no recipes found in the repository"
    assert sorted(bundled_recipes()) == RECIPE_NAMES
    assert set(TIMM_STANDARD) | {"vit_22b"} <= set(RECIPE_NAMES)


def _approx_params(spec) -> int:
    return 12 * spec.embed_dim**2 * spec.depth


def _registry_for(name: str):
    """Recipes under ``recipes/plugins/`` need the repository's plugins; all others must
    validate with the built-ins alone."""
    return repo_registry() if name.startswith("plugins/") else None


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_bundled_recipe_validates_and_builds(name, fast_init):
    registry = _registry_for(name)
    spec = load_spec(name, registry=registry)
    assert spec == load_spec(REPO / "recipes" / f"{name}.yaml", registry=registry)  # by name == by path
    assert spec.name == Path(name).name  # the recipe's name is its file name
    h, w = spec.img_hw
    if _approx_params(spec) > 150e6:  # large, huge, 22b: shapes only, nothing allocated
        model = build_model(spec, device="meta", registry=registry)
        assert all(p.is_meta for p in model.parameters())
        images = torch.empty(2, spec.in_chans, h, w, device="meta")
    else:
        model = build_model(spec, seed=0, registry=registry).eval()
        images = torch.randn(2, spec.in_chans, h, w)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, spec.num_classes)
    if not out.is_meta:
        assert torch.isfinite(out).all()


def _timm_meta(name: str, **kwargs):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize("name", TIMM_STANDARD)
def test_standard_recipe_matches_timm_parameter_count(name):
    # timm's vit_huge_patch14_224 defaults to a headless in21k model: ask for 1000 classes.
    ref = _timm_meta(name, num_classes=1000)
    ours = build_model(name, device="meta")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    # and parameter by parameter (vitlab's learned position table is pos_embed.weight)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.named_parameters()}
    our_shapes = {("pos_embed" if k == "pos_embed.weight" else k): tuple(v.shape) for k, v in ours.named_parameters()}
    assert our_shapes == ref_shapes


def vit22b_params_closed_form() -> int:
    """ViT-22B (Dehghani et al. 2023, Table 1): width D=6144, depth L=48, 48 heads (head_dim
    128), MLP width F=24576, patch 14 at 224 px (N=256 patches), no class token, average pooling.
    Per the paper: parallel attention/MLP branches from ONE pre-norm, qk-norm (a LayerNorm over
    head_dim on queries and keys), no bias on the QKV projection. The recipe keeps biases on the
    output projection, the MLP and the LayerNorms, a learned position table and a 1000-way head.

        patch embed   C*P*P*D + D
        positions     N*D
        per block     2D (shared norm) + 3D^2 (qkv) + 2*2*128 (q/k norms) + D^2 + D (out proj)
                      + D*F + F (fc1) + F*D + D (fc2)
        final norm    2D
        head          D*1000 + 1000
    """
    C, P, D, L, F, hd, N, K = 3, 14, 6144, 48, 24576, 128, (224 // 14) ** 2, 1000
    per_block = 2 * D + 3 * D * D + 2 * 2 * hd + (D * D + D) + (D * F + F) + (F * D + D)
    return (C * P * P * D + D) + N * D + L * per_block + 2 * D + (D * K + K)


def test_vit22b_parameter_count_closed_form():
    expected = vit22b_params_closed_form()
    assert 21.6e9 < expected < 21.8e9  # the paper's "21.7B"
    model = build_model("vit_22b", device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected
    tokens = model.forward_features(torch.empty(2, 3, 224, 224, device="meta"))
    assert tokens.shape == (2, 256, 6144)  # no class token: patches only


# --- overrides -------------------------------------------------------------------------------

TINY_RECIPE = REPO / "recipes" / "vit_tiny_patch16_224.yaml"


def test_overrides_mapping():
    s = load_spec(TINY_RECIPE, overrides={"depth": 6, "attention.params.qk_norm": True})
    assert s.depth == 6 and s.attention.params["qk_norm"] is True
    assert s.attention.params["qkv_bias"] is True  # untouched params of the recipe stay
    assert s.embed_dim == 192
    assert len(build_model(s, device="meta").blocks) == 6


def test_overrides_strings_equal_mapping():
    a = load_spec(TINY_RECIPE, overrides=["depth=6", "attention.params.qk_norm=true", "img_size=[224, 192]"])
    b = load_spec(TINY_RECIPE, overrides={"depth": 6, "attention.params.qk_norm": True, "img_size": [224, 192]})
    assert a == b and a.img_hw == (224, 192)


def test_override_single_string():
    assert load_spec(TINY_RECIPE, overrides="depth=6").depth == 6


def test_override_component_name_drops_old_params(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**TINY, "pos_embed": {"name": "learned", "params": {"include_prefix": False}}}))
    assert load_spec(path).pos_embed.params == {"include_prefix": False}
    s = load_spec(path, overrides={"pos_embed.name": "sincos2d"})
    assert s.pos_embed.name == "sincos2d" and "include_prefix" not in s.pos_embed.params
    s = load_spec(path, overrides=["pos_embed.params.temperature=100", "pos_embed.name=sincos2d"])
    assert s.pos_embed.params["temperature"] == 100.0  # params given with the new name are kept
    # same name: params merge instead
    s = load_spec(path, overrides={"pos_embed.name": "learned"})
    assert s.pos_embed.params == {"include_prefix": False}
    # overriding a spec object works the same way
    s = load_spec(load_spec(path), overrides={"pos_embed.name": "sincos2d"})
    assert "include_prefix" not in s.pos_embed.params


@pytest.mark.parametrize(
    "override, loc",
    [
        ({"detph": 6}, "detph"),
        ({"attention.params.qk_nrom": True}, "attention.params.qk_nrom"),
        ({"attention.name": "mhas"}, "attention.name"),
        (["depth=six"], "depth"),
    ],
)
def test_override_errors_name_the_key(override, loc):
    with pytest.raises(SpecError) as err:
        load_spec(TINY_RECIPE, overrides=override)
    assert [p.loc for p in err.value.problems] == [loc]
    assert str(TINY_RECIPE) in str(err.value)  # the recipe is named too


@pytest.mark.parametrize("override, fragment", [(["depth"], "KEY=VALUE"), (["=3"], "KEY=VALUE"),
                                                (["depth.x=1"], "depth"), (["attention..name=x"], "malformed")])
def test_malformed_overrides(override, fragment):
    with pytest.raises(SpecError, match=fragment):
        load_spec(TINY_RECIPE, overrides=override)


# --- extends ---------------------------------------------------------------------------------


def test_extends_relative_path_and_child_wins(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "parent.yaml").write_text(yaml.safe_dump(
        {**TINY, "name": "parent", "depth": 3, "attention": {"name": "mhsa", "params": {"qk_norm": True}}}))
    child = tmp_path / "child" / "child.yaml"
    child.parent.mkdir()
    child.write_text("extends: ../base/parent.yaml\nname: child\ndepth: 4\nattention: {params: {qkv_bias: false}}\n")
    grandchild = tmp_path / "child" / "grandchild.yaml"
    grandchild.write_text("extends: child.yaml\nname: grandchild\nattention: {name: mhsa}\n")
    monkeypatch.chdir(tmp_path / "base")  # resolved relative to the file, not the cwd
    monkeypatch.setenv("VITLAB_ALLOW_EXTENDS_OUTSIDE", "1")  # ../base is outside child's folder
    s = load_spec(child)
    assert (s.name, s.depth, s.embed_dim) == ("child", 4, 32)
    assert s.attention.params["qk_norm"] is True and s.attention.params["qkv_bias"] is False  # merged
    g = load_spec(grandchild)
    assert (g.name, g.depth) == ("grandchild", 4) and g.attention.params["qk_norm"] is True


def test_extends_component_name_change_replaces_params(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**TINY, "block": {"name": "parallel", "params": {"shared_norm": False}}}))
    (tmp_path / "c.yaml").write_text("extends: p.yaml\nblock: prenorm\n")
    s = load_spec(tmp_path / "c.yaml")
    assert s.block.name == "prenorm" and "shared_norm" not in s.block.params


def test_extends_bundled_name(tmp_path):
    (tmp_path / "c.yaml").write_text("extends: vit_tiny_patch16_224\nname: mine\nreg_tokens: 2\n")
    s = load_spec(tmp_path / "c.yaml")
    assert (s.name, s.embed_dim, s.depth, s.reg_tokens) == ("mine", 192, 12, 2)
    # and from a mapping
    s = load_spec({"extends": "vit_tiny_patch16_224", "depth": 2})
    assert (s.embed_dim, s.depth) == (192, 2)


def test_missing_recipe_suggests_bundled_name():
    with pytest.raises(SpecError, match="did you mean 'vit_tiny_patch16_224'"):
        load_spec("vit_tiny_patch16_24")


# --- dump / load, JSON -----------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_dump_load_round_trip(name):
    s = load_spec(name, registry=_registry_for(name))
    text = dump_spec(s)
    assert load_spec(yaml.safe_load(text), registry=_registry_for(name)) == s
    assert yaml.safe_load(text) == s.to_dict()  # every field present


def test_round_trip_rectangular_and_overridden():
    s = load_spec(TINY, overrides={"img_size": [32, 48], "patch_size": [8, 16], "block.params.init_values": 0.1})
    assert load_spec(yaml.safe_load(dump_spec(s))) == s


def test_json_recipe(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**TINY, "attention": {"name": "mhsa", "params": {"qk_norm": True}}}))
    s = load_spec(path)
    assert s.attention.params["qk_norm"] and s.depth == 2
    (tmp_path / "c.json").write_text(json.dumps({"extends": "r.json", "depth": 3}))
    assert load_spec(tmp_path / "c.json").depth == 3
    assert load_spec(json.loads(json.dumps(s.to_dict()))) == s


def test_recipes_dir_points_at_repository_recipes():
    assert recipes_dir().resolve() == (REPO / "recipes").resolve()
