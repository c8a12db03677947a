"""Unsafe files (issue 8): pickles that would run code, safe YAML, wrong dtypes, other
architectures, and files that are never overwritten without --force nor left half-written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import vitlab
from vitlab.cli import cli, load_commands
from vitlab.fileio import atomic_write
from vitlab.images import procedural_image, save_png

TINY = {"name": "tiny", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 3}


class _CreatesFile:
    """Unpickling this calls open(path, "w"): code running from a checkpoint."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def evil_pth(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 32), "payload": _CreatesFile(marker)}, path)
    assert not marker.exists()
    return path, marker


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pickle_refused_by_load_timm_weights(evil_pth):
    path, marker = evil_pth
    model = vitlab.build_model(TINY, seed=0)
    before = _state(model)
    with pytest.raises(vitlab.WeightsError):
        vitlab.load_timm_weights(model, path)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pickle_refused_by_vitlab_load(evil_pth):
    path, marker = evil_pth
    with pytest.raises(vitlab.WeightsError):
        vitlab.load(path)
    assert not marker.exists()


def test_pickle_refused_by_the_cli(evil_pth, tmp_path):
    path, marker = evil_pth
    load_commands()
    image = tmp_path / "in.png"
    save_png(procedural_image(32), image)
    res = CliRunner().invoke(cli, ["attention", "vit_tiny_patch16_224", "--image", str(image), "--weights", str(path),
                                   "-o", str(tmp_path / "out.png")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not marker.exists() and not (tmp_path / "out.png").exists()


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "yaml-ran"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ndepth: 2\n")
    with pytest.raises(vitlab.SpecError, match="invalid YAML"):
        vitlab.load_spec(recipe)
    assert not marker.exists()


def test_wrong_dtype_refused_and_model_unchanged(tmp_path):
    model = vitlab.build_model(TINY, seed=0)
    before = _state(model)
    donor = vitlab.to_timm_state_dict(vitlab.build_model(TINY, seed=1))
    bad = {k: (v.to(torch.int32) if k.endswith("fc2.weight") else v) for k, v in donor.items()}
    with pytest.raises(vitlab.WeightsError, match="wrong dtype"):
        vitlab.load_timm_weights(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # lower float precision is an ordinary checkpoint, not an error
    report = vitlab.load_timm_weights(model, {k: v.half() for k, v in donor.items()})
    assert report.ok


def test_native_checkpoint_with_wrong_dtype_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = vitlab.save(vitlab.build_model(TINY, seed=0), tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["head.weight"] = tensors["head.weight"].to(torch.int64)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(vitlab.WeightsError, match="not floating point"):
        vitlab.load(path)


def test_other_architecture_refused_when_strict_and_model_unchanged():
    model = vitlab.build_model(TINY, seed=0)
    before = _state(model)
    other = vitlab.to_timm_state_dict(vitlab.build_model({**TINY, "embed_dim": 64}, seed=0))
    with pytest.raises(vitlab.WeightsError, match="nothing was loaded"):
        vitlab.load_timm_weights(model, other, strict=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- nothing lost ----------------------------------------------------------------------------------

def test_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old contents")

    def dies_half_way(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies_half_way, force=True)
    assert target.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def _writing_commands(tmp_path: Path):
    image = tmp_path / "in.png"
    save_png(procedural_image(32), image)
    return {
        "flops": lambda out: ["flops", "vit_tiny_patch16_224", "--format", "json", "-o", str(out)],
        "compare": lambda out: ["compare", "vit_tiny_patch16_224", "--format", "csv", "--output", str(out)],
        "compare --plot": lambda out: ["compare", "vit_tiny_patch16_224", "--plot", str(out)],
        "attention": lambda out: ["attention", "vit_tiny_patch16_224", "--image", str(image), "-o", str(out)],
        "from-timm": lambda out: ["from-timm", "vit_tiny_patch16_224", "-o", str(out)],
        "schema": lambda out: ["schema", "-o", str(out)],
    }


@pytest.mark.parametrize("command", ["flops", "compare", "compare --plot", "attention", "from-timm", "schema"])
def test_no_command_overwrites_without_force(tmp_path, command):
    load_commands()
    suffix = ".png" if command in ("compare --plot", "attention") else ".out"
    out = tmp_path / f"mine{suffix}"
    out.write_bytes(b"the user's own file")
    args = _writing_commands(tmp_path)[command](out)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "--force" in res.output, res.output
    assert out.read_bytes() == b"the user's own file"
    res = CliRunner().invoke(cli, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() != b"the user's own file"


# --- plugins that misbehave --------------------------------------------------------------------------

class _BuggyCheck(vitlab.PosEncoding):
    """Test-only: a check() with a bug in it."""

    name = "buggycheck"

    @classmethod
    def check(cls, ctx, params):
        return 1 / 0


class _BuggyInit(vitlab.PosEncoding):
    """Test-only: a constructor with a bug in it."""

    name = "buggyinit"

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        raise KeyError("oops")


class _Misbehaving:
    @vitlab.hookimpl
    def vitlab_register_components(self, register):
        register(_BuggyCheck)
        register(_BuggyInit)


def test_plugin_component_bugs_name_the_plugin_and_others_still_work(tmp_path):
    from vitlab.plugins import make_plugin_manager

    _, registry = make_plugin_manager(entry_points=False, plugins=[("bad-plugin", _Misbehaving())])
    with pytest.raises(vitlab.SpecError, match=r"pos_embed: buggycheck \(plugin 'bad-plugin'\): its check\(\) raised ZeroDivisionError"):
        vitlab.load_spec({**TINY, "pos_embed": "buggycheck"}, registry=registry)
    spec = vitlab.load_spec({**TINY, "pos_embed": "buggyinit"}, registry=registry)
    with pytest.raises(vitlab.PluginError, match="pos_embed 'buggyinit' from plugin 'bad-plugin' failed to build: KeyError"):
        vitlab.build_model(spec, registry=registry)
    # everything that does not use the plugin's components still works with it installed
    model = vitlab.build_model(vitlab.load_spec(TINY, registry=registry), registry=registry)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
