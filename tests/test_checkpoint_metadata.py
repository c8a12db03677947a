"""A checkpoint's stored spec and tensors, as untrusted input: a spec that names other files (an
``extends``) is refused and nothing is read; sizes the spec claims are checked against the tensors
before anything is built; forged safetensors headers and over-long stored specs are refused.

Every refusal is checked the same way: a ``VitlabError`` (or, from the CLI, exit code 2 and exactly
one ``error: ...`` line on stderr), quickly, and without the secret, the allocation or the file the
input asked for.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import vitlab
import vitlab.checkpoint
from vitlab.errors import WeightsError
from vitlab.images import procedural_image, save_png

from untrusted_inputs import QUICK, TINY, one_line, tiny_image, tiny_recipe, tiny_tensors, write_checkpoint  # noqa: F401
from conftest import invoke_cli, one_error

pytestmark = pytest.mark.usefixtures("single_thread")

SECRET = "SECRET_MARKER_7f3a9c"


@pytest.fixture()
def secret(tmp_path) -> Path:
    """A file a checkpoint must never get vitlab to read: a YAML mapping, so that followed as a
    recipe its key would come back in an 'unknown field' message."""
    path = tmp_path / "private" / "secret.yaml"
    path.parent.mkdir()
    path.write_text(f"{SECRET}: hunter2\n")
    return path


# --- 1. a checkpoint's spec cannot reference other files ------------------------------------------------

@pytest.mark.parametrize("target", ["absolute", "relative", "bundled"])
def test_checkpoint_extends_is_refused_and_nothing_is_read(tmp_path, secret, monkeypatch, target):
    import vitlab.recipes

    ref = {"absolute": str(secret), "relative": "private/secret.yaml", "bundled": "vit_tiny_patch16_224"}[target]
    path = write_checkpoint(tmp_path / "ckpt.safetensors", {**TINY, "extends": ref})
    opened = []
    real_read = vitlab.recipes._read_text
    monkeypatch.setattr(vitlab.recipes, "_read_text", lambda p: opened.append(p) or real_read(p))
    monkeypatch.chdir(tmp_path)  # where the relative reference would resolve
    for read in (vitlab.load, vitlab.checkpoint.read_spec):
        with pytest.raises(vitlab.VitlabError) as info:
            read(path)
        line = one_line(info.value)
        assert SECRET not in line and "hunter2" not in line
        assert line.startswith(f"{path}: vitlab_spec.extends: ") and "cannot reference other files" in line
    assert opened == []  # no recipe file was opened at all


def test_checkpoint_extends_secret_never_reaches_the_cli(tmp_path, secret):
    ckpt = write_checkpoint(tmp_path / "ckpt.safetensors", {**TINY, "extends": str(secret)})
    recipe, image = tiny_recipe(tmp_path), tiny_image(tmp_path)
    out = tmp_path / "out.png"
    commands = [
        ["attention", recipe, "--image", image, "--weights", ckpt, "-o", out],
        ["show", ckpt],
        ["validate", ckpt],
        ["build", ckpt],
    ]
    for args in commands:
        res = invoke_cli(*args)
        line = one_error(res)
        assert SECRET not in res.output and "hunter2" not in res.output, args
        assert str(ckpt) in line, line
    assert not out.exists()


def test_load_spec_without_files_refuses_paths_and_names(secret):
    for source in (str(secret), secret, "vit_tiny_patch16_224"):
        with pytest.raises(vitlab.SpecError, match="not a file or recipe name"):
            vitlab.load_spec(source, files=False)
    with pytest.raises(vitlab.SpecError, match="^extends: .*cannot reference other files"):
        vitlab.load_spec({"extends": str(secret), "name": "x"}, files=False)
    assert vitlab.load_spec(TINY, files=False).depth == 1  # plain data still loads


# --- 2. sizes against the tensors, before anything is built -------------------------------------------------

CLAIMS = {  # field -> (claimed value, the value the tensors hold)
    "depth": (10**12, 1),
    "embed_dim": (10**9, 32),
    "reg_tokens": (10**12, 0),
    "num_classes": (10**12, 3),
}


@pytest.mark.parametrize("field", CLAIMS)
def test_claimed_sizes_are_refused_quickly_before_building(tmp_path, monkeypatch, field):
    import vitlab.model

    claimed, actual = CLAIMS[field]
    path = write_checkpoint(tmp_path / "big.safetensors", {**TINY, field: claimed})
    assert path.stat().st_size < 256 * 1024  # a small file, claiming a huge model
    built = []
    real_build = vitlab.recipes.build_model
    monkeypatch.setattr(vitlab.recipes, "build_model", lambda *a, **k: built.append(a) or real_build(*a, **k))
    for read in (vitlab.load, vitlab.checkpoint.read_spec):
        start = time.monotonic()
        with pytest.raises(WeightsError) as info:  # a MemoryError would fail this test
            read(path)
        assert time.monotonic() - start < QUICK
        line = one_line(info.value)
        assert line.startswith(f"{path}: vitlab_spec.{field} is {claimed} ")
        assert str(actual) in line.removeprefix(f"{path}: vitlab_spec.{field} is {claimed} ")
    assert built == []


def test_claimed_sizes_are_refused_by_the_cli(tmp_path):
    ckpt = write_checkpoint(tmp_path / "big.safetensors", {**TINY, "depth": 10**12})
    start = time.monotonic()
    line = one_error(invoke_cli("attention", tiny_recipe(tmp_path), "--image", tiny_image(tmp_path),
                              "--weights", ckpt, "-o", tmp_path / "out.png"))
    assert time.monotonic() - start < QUICK
    assert "vitlab_spec.depth is 1000000000000" in line


def test_tables_computed_from_the_spec_are_bounded(tmp_path):
    """sincos2d positions have no tensor in the file; a huge image size would allocate them."""
    sincos = {"pos_embed": "sincos2d"}
    # 8192 px in 8 px patches: 1024 x 1024 tokens x 32 channels = 33.5 M values from a 30 K-value file
    path = write_checkpoint(tmp_path / "wide.safetensors", {**TINY, **sincos, "img_size": 8192},
                       tensors=tiny_tensors(sincos))
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        vitlab.load(path)
    assert time.monotonic() - start < QUICK
    line = one_line(info.value)
    assert "vitlab_spec.img_size is 8192x8192: 1,048,577 tokens x embed_dim 32" in line


def test_small_depth_mismatch_still_lists_the_missing_tensors(tmp_path):
    path = write_checkpoint(tmp_path / "short.safetensors", {**TINY, "depth": 2})
    with pytest.raises(WeightsError) as info:
        vitlab.load(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: vitlab_spec.depth is 2 but the file has tensors for 1 blocks (blocks.<i>.*)"
    assert "missing: blocks.1.norm1.weight" in lines


def _forged(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps({"__metadata__": {"format": "vitlab", "vitlab_spec": json.dumps(TINY)}, **header}).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("forgery", ["tensor past the end", "tensor of 10**12 floats", "header length past the end",
                                     "header length 10**15"])
def test_forged_safetensors_headers_are_refused(tmp_path, forgery):
    path = tmp_path / "forged.safetensors"
    if forgery == "tensor past the end":
        _forged(path, {"cls_token": {"dtype": "F32", "shape": [1, 1, 32], "data_offsets": [0, 128]}}, b"\0" * 16)
    elif forgery == "tensor of 10**12 floats":
        _forged(path, {"cls_token": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 16)
    elif forgery == "header length past the end":
        _forged(path, {}, length=10**6)
    else:
        _forged(path, {}, length=10**15)
    assert not vitlab.checkpoint.is_vitlab_checkpoint(path)
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        vitlab.load(path)
    assert time.monotonic() - start < QUICK
    assert "not a valid safetensors file" in one_line(info.value)


def test_stored_spec_longer_than_the_limit(tmp_path):
    path = write_checkpoint(tmp_path / "long.safetensors", {**TINY, "name": "x" * (2 << 20)})
    with pytest.raises(WeightsError) as info:
        vitlab.load(path)
    assert "a stored spec is at most 1,048,576" in one_line(info.value)


@pytest.mark.parametrize("text, expected", [
    ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested deeper than 64 levels"),
    ('{"depth": 1, "depth": 1000000000000}', "duplicate key 'depth'"),
    ('{"depth": ' + "9" * 5000 + "}", "integer of 5000 digits"),
], ids=["nesting", "duplicate", "huge int"])
def test_stored_spec_parser_limits(tmp_path, text, expected):
    path = write_checkpoint(tmp_path / "odd.safetensors", text)
    with pytest.raises(vitlab.VitlabError) as info:
        vitlab.load(path)
    line = one_line(info.value)
    assert line.startswith(f"{path}: vitlab_spec: ") and expected in line


def test_load_rebuilds_buffers_without_a_second_set_of_weights(tmp_path, monkeypatch):
    import vitlab.model

    spec = vitlab.load_spec({**TINY, "pos_embed": "sincos2d", "depth": 2})
    model = vitlab.build_model(spec, seed=0).eval()
    path = vitlab.save(model, tmp_path / "m.safetensors")
    real_build = vitlab.recipes.build_model
    params_on_meta = []

    def spy(*args, **kwargs):
        built = real_build(*args, **kwargs)
        params_on_meta.append(all(p.is_meta for p in built.parameters()))
        return built

    monkeypatch.setattr(vitlab.recipes, "build_model", spy)
    register = torch.nn.Module.register_parameter
    loaded = vitlab.load(path).eval()
    assert params_on_meta == [True, True]  # the model itself, then the one the buffers come from
    assert torch.nn.Module.register_parameter is register  # the patch is gone
    assert all(not b.is_meta for b in loaded.buffers())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
