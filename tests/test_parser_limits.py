"""Recipe values and files a careless user or an attacker gives (beyond ``test_unsafe_files.py``,
``test_checkpoint_metadata.py`` and ``test_input_limits.py``).

Each is checked the same way: from the CLI, exit code 2 and exactly one ``error: ...`` line, quickly,
nothing written; from the API, one ``VitlabError`` line. Families:

* ``--set`` into ``layers`` / ``stages`` with junk;
* layouts of absurd size (``stages`` of 10**6 entries, ``at: "0-99999999999999999"``);
* numbers on the command line (image size, batch size, seed, crop, mean / std);
* NaN and infinities in every float field, of the spec and of every registered component;
* recipe files that are not files (a directory, a FIFO, a symlink loop, a device) or carry a BOM;
* file names with a line break in the messages of ``attention``, ``from-timm``, ``schema``,
  ``new-plugin``;
* bounded memory: a meta-device count of 1 px patches on a 4096 px image.

Cases that fail because of code this file's author does not own are ``xfail(strict=True)`` with the
reason: they turn into failures (to be un-marked) the day they are fixed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import vitlab
from vitlab.images import procedural_image, save_png

from conftest import subprocess_env, invoke_cli, one_error

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"name": "tiny", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 3}
STAGE = {"depth": 1, "embed_dim": 32, "num_heads": 2}
QUICK = 10.0  # seconds: a generous bound; the refusals take milliseconds


# --- helpers -----------------------------------------------------------------------------------------

_invoke = invoke_cli


_one_error = one_error


def _refused_quickly(tmp_path: Path, *args) -> str:
    """Run a command that must be refused: one line, quickly, and nothing new in ``tmp_path``."""
    before = sorted(p.name for p in tmp_path.rglob("*"))
    start = time.monotonic()
    line = _one_error(_invoke(*args))
    assert time.monotonic() - start < QUICK
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    return line


@pytest.fixture()
def recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _union_xfail(case):
    # LayerSpec.at is a union (index, list, string): one bad value must still be one line
    return pytest.param(*case)


# --- 1. --set into layers and stages -------------------------------------------------------------------

SET_CASES = [  # (--set value, words the one line must hold)
    ("layers=junk", ["layers: input should be a valid list", "'junk'"]),
    ("layers.0.at=3", ["layers: input should be a valid list"]),
    ("layers.x=1", ["layers: input should be a valid list"]),
    ("layers=[{at: 0, attention: nope}]", ["layers.0.attention.name: unknown attention 'nope'", "known: "]),
    ('layers=[{at: "0-99999999999999999"}]', ["layers.0.at: block 99999999999999999 does not exist (depth 1)"]),
    ("layers=[{at: ''}]", ["layers.0.at:", "is not an index or a range"]),
    ("layers=[{at: 0-0-0}]", ["layers.0.at:", "is not an index or a range"]),
    ("layers=[{at: 0, mlp_ratio: .nan}]", ["layers.0.mlp_ratio: input should be a finite number"]),
    ("layers=[{at: 0, bogus: 1}]", ["layers.0.bogus"]),
    ("stages=5", ["stages: input should be a valid list"]),
    ("stages.0.depth=2", ["stages: input should be a valid list"]),
    ("stages=[]", ["stages: list should have at least 1 item"]),
    ("stages=[{depth: 0, embed_dim: 32, num_heads: 2}]", ["stages.0.depth"]),
    ("stages=[{depth: 1, embed_dim: 32, num_heads: 2}, {depth: 1, embed_dim: 32, num_heads: 2, transition: 7}]",
     ["stages.1.transition: input should be a valid dictionary"]),
    ("transition.params=[1]", ["transition.params: input should be a valid dictionary"]),
    _union_xfail(("layers=[{at: -1}]", ["layers.0.at", "-1"])),
    _union_xfail(("layers=[{at: [0, 0.5]}]", ["layers.0.at", "0.5"])),
    _union_xfail(("layers=[{at: true}]", ["layers.0.at", "True"])),
]


@pytest.mark.parametrize("value, words", SET_CASES)
def test_set_into_layers_and_stages(tmp_path, recipe, value, words):
    for command in ("validate", "flops"):
        line = _refused_quickly(tmp_path, command, recipe, "--set", value)
        assert line.startswith(f"error: {recipe}: "), line
        for word in words:
            assert word in line, line


# --- 2. layouts of absurd size --------------------------------------------------------------------------

def test_stages_past_the_depth_limit_in_a_json_file(tmp_path):
    """20,000 one-block stages (under the 1 MiB file limit): refused by the depth limit, quickly.
    The JSON reader used to count lines from the start of the text for every key: 24 s here."""
    path = tmp_path / "stages.json"
    path.write_text(json.dumps({"name": "s", "stages": [STAGE] * 20_000}))
    assert path.stat().st_size < vitlab.recipes.MAX_RECIPE_BYTES
    line = _refused_quickly(tmp_path, "validate", path)
    assert "stages: 20,000 stages are beyond what can be built (at most 10,000" in line


def test_a_million_stages_on_the_command_line(tmp_path, recipe):
    """A --set value longer than a recipe may be is refused before the (pure-Python) YAML reader
    spends seconds per MiB on it."""
    value = "stages=[" + ", ".join(["{depth: 1, embed_dim: 32, num_heads: 2}"] * 10**5) + "]"
    line = _refused_quickly(tmp_path, "validate", recipe, "--set", value)
    assert "stages: text of 4,100,000 characters; a recipe or value is at most 1,048,576 bytes" in line


def test_many_stages_in_yaml_stop_at_the_value_limit(tmp_path):
    path = tmp_path / "stages.yaml"
    path.write_text("name: s\nstages:\n" + "- {depth: 1, embed_dim: 32, num_heads: 2}\n" * 20_000)
    assert "more than 100,000 values" in _refused_quickly(tmp_path, "validate", path)


def test_a_million_stages_through_the_api():
    start = time.monotonic()
    with pytest.raises(vitlab.SpecError, match="at most 10,000"):
        vitlab.load_spec({"name": "s", "stages": [STAGE] * 10**5})  # a tenth of the million: ~5 s today
    assert time.monotonic() - start < 2.0


def test_a_range_as_long_as_its_digits_in_a_recipe_file(tmp_path):
    path = tmp_path / "at.yaml"
    path.write_text(yaml.safe_dump({**TINY, "depth": 2, "layers": [{"at": "0-99999999999999999", "mlp_ratio": 2.0}]}))
    line = _refused_quickly(tmp_path, "validate", path)
    assert "layers.0.at: block 99999999999999999 does not exist (depth 2)" in line


# --- 3. numbers on the command line -----------------------------------------------------------------

@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "in.png"
    save_png(procedural_image(32), path)
    return path


@pytest.mark.parametrize("args, words", [
    (["flops", "{recipe}", "--img-size", "0"], ["--img-size: expected a positive integer or HxW, got '0'"]),
    (["flops", "{recipe}", "--img-size", "-5"], ["--img-size", "'-5'"]),
    (["flops", "{recipe}", "--img-size", "32x0"], ["--img-size", "'32x0'"]),
    (["flops", "{recipe}", "--img-size", "nan"], ["--img-size", "'nan'"]),
    (["flops", "{recipe}", "--img-size", "99999999999"], ["img_size: 99999999999 is beyond what can be built"]),
    (["flops", "{recipe}", "-b", "-1"], ["--batch-size", "-1 is not in the range"]),
    (["flops", "{recipe}", "-b", str(10**30)], ["batch", "16777216"]),
    (["build", "{recipe}", "--batch-size", "-1"], ["--batch-size", "is not in the range"]),
    (["bench", "{recipe}", "--batch-size", "-3"], ["--batch-size", "is not in the range"]),
    (["attention", "{recipe}", "--image", "{image}", "-o", "{out}", "--crop-pct", "1e-9"],
     ["--crop-pct 1e-09 resizes the image to 32,000,000,000 px", "at least"]),
    (["attention", "{recipe}", "--image", "{image}", "-o", "{out}", "--crop-pct", "nan"], ["crop_pct must be in (0, 1]"]),
    (["attention", "{recipe}", "--image", "{image}", "-o", "{out}", "--std", "0,0,0"], ["--std: expected three positive"]),
    (["attention", "{recipe}", "--image", "{image}", "-o", "{out}", "--std", "1,nan,1"], ["--std: expected three positive"]),
    (["attention", "{recipe}", "--image", "{image}", "-o", "{out}", "--std", "-1,1,1"], ["--std: expected three positive"]),
    (["attention", "{recipe}", "--image", "{image}", "-o", "{out}", "--mean", "inf,0,0"], ["--mean: expected three finite"]),
    (["attention", "{recipe}", "--image", "{image}", "-o", "{out}", "--rollout", "--discard-ratio", "nan"],
     ["discard"]),
    (["attention", "{recipe}", "--image", "{image}", "-o", "{out}", "--seed", str(10**30)], ["--seed", "expected an integer from 0 to 2**63 - 1"]),
    (["attention", "{recipe}", "--image", "{image}", "-o", "{out}", "--layer", str(10**30)], ["--layer", "out of range"]),
])
def test_numbers_on_the_command_line(tmp_path, recipe, image, args, words):
    out = tmp_path / "sub" / "o.png"
    out.parent.mkdir()
    args = [a.format(recipe=recipe, image=image, out=out) for a in args]
    line = _refused_quickly(tmp_path, *args)
    for word in words:
        assert word in line, line


# --- 4. NaN and infinities in every float field ------------------------------------------------------

def _float_fields() -> list[str]:
    """Every float field: the spec's own, and every registered component's params (selected by
    name in the same --set), so a component registered tomorrow is tried the day it is."""
    out = [f"{name}" for name, f in vitlab.ViTSpec.model_fields.items() if "float" in str(f.annotation)]
    for info in vitlab.make_plugin_manager(entry_points=False)[1].components():
        out += [f"{info.kind}={info.name}:{p}" for p, f in info.cls.Params.model_fields.items() if "float" in str(f.annotation)]
    return out


@pytest.mark.parametrize("field", _float_fields())
def test_nan_and_inf_in_every_float_field(tmp_path, recipe, field):
    if "=" in field:
        kind, _, rest = field.partition("=")
        name, _, param = rest.partition(":")
        sets, loc = ["--set", f"{kind}.name={name}"], f"{kind}.params.{param}"
    else:
        sets, loc = [], field
    for value in (".nan", ".inf", "-.inf"):
        line = _refused_quickly(tmp_path, "validate", recipe, *sets, "--set", f"{loc}={value}")
        assert f"{loc}: input should be a finite number" in line, line
    # JSON has its own spellings (Python's reader accepts NaN and Infinity)
    if "=" not in field:
        path = tmp_path / "nan.json"
        path.write_text(json.dumps({**TINY, field: float("nan")}))
        assert f"{field}: input should be a finite number" in _one_error(_invoke("validate", path))


def test_the_float_fields_are_found():
    fields = _float_fields()
    assert {"mlp_ratio", "drop_path_rate", "norm=layernorm:eps", "pos_embed=sincos2d:temperature"} <= set(fields)


# --- 5. recipe files that are not files, or carry a BOM ------------------------------------------------

def _extends(tmp_path: Path, target: str) -> Path:
    path = tmp_path / "child.yaml"
    path.write_text(f"extends: {target}\nname: child\n")
    return path


def test_extends_a_directory(tmp_path):
    (tmp_path / "adir").mkdir()
    line = _refused_quickly(tmp_path, "validate", _extends(tmp_path, "adir"))
    assert "extends: recipe 'adir' not found" in line


def test_extends_a_fifo_does_not_block(tmp_path):
    """Opening a FIFO blocks until something writes into it: never opened."""
    os.mkfifo(tmp_path / "pipe.yaml")
    line = _refused_quickly(tmp_path, "validate", _extends(tmp_path, "pipe.yaml"))
    assert "extends: recipe 'pipe.yaml' not found" in line
    assert "not found" in _refused_quickly(tmp_path, "validate", tmp_path / "pipe.yaml")


def test_extends_a_symlink_loop(tmp_path):
    os.symlink("loop.yaml", tmp_path / "loop.yaml")  # resolving it fails with ELOOP
    line = _refused_quickly(tmp_path, "validate", _extends(tmp_path, "loop.yaml"))
    assert "extends: recipe 'loop.yaml' not found" in line


def test_extends_cycle_through_a_symlink(tmp_path):
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: x\n")
    os.symlink("b.yaml", tmp_path / "a.yaml")
    assert "extends cycle" in _refused_quickly(tmp_path, "validate", tmp_path / "b.yaml")


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/stdin", "[a, b]", "{x: 1}", "''"])
def test_extends_devices_and_non_names(tmp_path, target):
    line = _refused_quickly(tmp_path, "validate", _extends(tmp_path, target))
    assert "extends" in line


def test_recipe_that_is_a_directory(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    assert "not found" in _refused_quickly(tmp_path, "validate", tmp_path / "d.yaml")


def test_json_recipe_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(TINY).encode())
    line = _refused_quickly(tmp_path, "validate", path)
    assert line.startswith(f"error: {path}: ") and "byte-order mark" in line
    # YAML allows a BOM (YAML 1.2, 5.2): still read
    ok = tmp_path / "bom.yaml"
    ok.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(TINY).encode())
    assert vitlab.load_spec(ok).name == "tiny"


# --- 6. file names with a line break, in messages of the commands that write or read files ------------

@pytest.fixture()
def odd(tmp_path) -> Path:
    path = tmp_path / "bad\nname"
    path.mkdir()
    return path


def test_attention_weights_named_with_a_newline(tmp_path, recipe, image, odd):
    out = tmp_path / "o.png"
    line = _refused_quickly(tmp_path, "attention", recipe, "--image", image, "-o", out, "--weights", odd / "no\nfile.pt")
    assert "weights file not found: " in line and "no\\nfile.pt" in line
    other = odd / "other\nspec.safetensors"
    vitlab.save(vitlab.build_model({**TINY, "num_classes": 5}, seed=0), other)
    line = _refused_quickly(tmp_path, "attention", recipe, "--image", image, "-o", out, "--weights", other)
    assert "other\\nspec.safetensors was saved from a different spec (differs in: num_classes)" in line


def test_attention_wrote_line_with_a_newline(tmp_path, recipe, image, odd):
    out = odd / "o\nut.png"
    res = _invoke("attention", recipe, "--image", image, "-o", out)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [f"wrote {tmp_path}/bad\\nname/o\\nut.png (3 heatmaps)"]


def test_schema_with_a_newline_in_the_output(tmp_path, odd):
    out = odd / "s\nchema.json"
    res = _invoke("schema", "-o", out)
    assert res.exit_code == 0 and res.stderr.splitlines() == [f"wrote {tmp_path}/bad\\nname/s\\nchema.json"]
    assert json.loads(out.read_text())["$schema"]
    # an existing file, a missing folder: refused before the schema is built
    assert "already exists; pass --force" in _refused_quickly(tmp_path, "schema", "-o", out)
    line = _refused_quickly(tmp_path, "schema", "-o", odd / "no\nfolder" / "s.json")
    assert "no\\nfolder" in line and "does not exist" in line


def test_schema_checks_the_output_before_building(tmp_path, monkeypatch):
    import vitlab.schema

    def must_not_run():
        raise AssertionError("the schema was built before the output path was checked")

    monkeypatch.setattr(vitlab.schema, "recipe_schema", must_not_run)
    (tmp_path / "a_file").write_text("x")
    assert "a_file" in _refused_quickly(tmp_path, "schema", "-o", tmp_path / "a_file" / "s.json")


def test_from_timm_with_a_newline_in_the_output(tmp_path, odd):
    pytest.importorskip("timm")
    out = odd / "r\necipe.yaml"
    res = _invoke("from-timm", "vit_tiny_patch16_224", "-o", out)
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [f"wrote {tmp_path}/bad\\nname/r\\necipe.yaml"]
    assert vitlab.load_spec(out).embed_dim == 192


@pytest.mark.parametrize("case", ["newline", "parent is a file", "name too long"])
def test_new_plugin_output_paths(tmp_path, case):
    if case == "newline":
        res = _invoke("new-plugin", "nl", "--kind", "mlp", "-o", tmp_path / "x\ny")
        assert res.exit_code == 0, res.output
        assert all("\n" not in line for line in res.stdout.splitlines())
        assert f"created vitlab-nl in {tmp_path}/x\\ny/ " in res.stdout
        return
    (tmp_path / "a_file").write_text("x")
    target = tmp_path / "a_file" / "pkg" if case == "parent is a file" else tmp_path / ("n" * 300)
    line = _refused_quickly(tmp_path, "new-plugin", "np", "--kind", "mlp", "-o", target)
    assert line.startswith("error: cannot write ") and ("Not a directory" in line or "too long" in line), line


# --- 7. bounded memory -----------------------------------------------------------------------------------

_COUNT_4096 = """
import json, resource, warnings
warnings.simplefilter("ignore")
# a hard cap as well, so that a regression fails in seconds instead of swapping for minutes
resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))
import vitlab
r = vitlab.analyze("vit_tiny_patch16_224", overrides={"patch_size": 1, "img_size": 4096, "pos_embed": "sincos2d"})
# the peak of this address space (VmHWM): getrusage's ru_maxrss survives execve, so a child of a
# large process (an xdist worker late in the suite) would report its parent's peak as its own
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"flops": r.flops, "by_kind": r.by_kind, "by_operator": r.by_operator, "rss_kib": peak}))
"""


def test_meta_count_of_one_pixel_patches_on_4096_px_is_bounded():
    """The patch convolution of 1 px patches on a 4096 px image has a (1, 192, 4096, 4096) output:
    12.9 GB if it is ever materialised. Counted on meta tensors it costs what a 224 px count costs,
    and the count is the closed form."""
    res = subprocess.run([sys.executable, "-c", _COUNT_4096], capture_output=True, text=True,
                         env=subprocess_env(VITLAB_DISABLE_PLUGINS="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["rss_kib"] < 2 * 2**20, got["rss_kib"]  # 2 GiB; about 0.7 GiB measured, mostly torch itself
    D, depth, classes = 192, 12, 1000
    n = 4096 * 4096  # patches
    N = n + 1  # and the class token
    patch = n * D * 3 * 1 * 1  # one multiply-add per input channel per output element
    attention = depth * (4 * N * D * D + 2 * N * N * D)  # qkv + proj, q·kᵀ + attn·v
    mlp = depth * 8 * N * D * D
    norm = (2 * depth + 1) * 5 * N * D
    assert got["by_kind"]["patch_embed"] == patch
    assert got["by_operator"]["aten::_convolution"] == patch  # under its own name, not the stand-in's
    assert got["flops"] == patch + attention + mlp + norm + D * classes


def test_extreme_aspect_ratio_image_is_bounded():
    """A 20000 x 1 px strip: resizing it whole before the crop would make 5.1M x 256 px (16 GB);
    the crop comes first, so the work is bounded by the output."""
    from vitlab.images import resize_center_crop

    strip = torch.rand(3, 20_000, 1)
    start = time.monotonic()
    out = resize_center_crop(strip, (224, 224))
    assert out.shape == (3, 224, 224) and time.monotonic() - start < 5.0
