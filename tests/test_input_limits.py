"""Limits on what vitlab reads and writes: parser limits of recipes and overrides, one line per
problem on the command line, output paths checked before any work (permissions, read-only folders,
SIGTERM mid-write), and images refused from their header (decompression bombs).

Every refusal is checked the same way: a ``VitlabError`` (or, from the CLI, exit code 2 and exactly
one ``error: ...`` line on stderr), quickly, and without the allocation or the file the input asked for.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import vitlab
import vitlab.checkpoint
from vitlab.errors import VitlabError, WeightsError
from vitlab.fileio import atomic_write, check_output
from vitlab.images import load_image, procedural_image, save_png

from untrusted_inputs import QUICK, TINY, one_line, tiny_image, tiny_recipe, tiny_tensors, write_checkpoint  # noqa: F401
from conftest import REPO, subprocess_env, invoke_cli, one_error

pytestmark = pytest.mark.usefixtures("single_thread")



# --- 3. parser limits ------------------------------------------------------------------------------------------

def _chain(tmp_path: Path, n: int) -> Path:
    for i in range(n):
        text = yaml.safe_dump(TINY) if i == 0 else f"extends: r{i - 1}.yaml\n"
        (tmp_path / f"r{i}.yaml").write_text(text)
    return tmp_path / f"r{n - 1}.yaml"


PARSER_CASES = {  # name -> (file name, text, words the one line must hold)
    "yaml nested past the stack": ("deep.yaml", "a: " + "[" * 100_000 + "]" * 100_000, ["nested deeper than 64"]),
    "yaml nested 65 levels": ("deep.yaml", "a: " + "[" * 64 + "]" * 64, ["nested deeper than 64"]),
    "json nested past the stack": ("deep.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nested deeper than 64"]),
    "json nested 65 levels": ("deep.json", '{"a": ' + "[" * 64 + "]" * 64 + "}", ["nested deeper than 64"]),
    "yaml 5000-digit integer": ("int.yaml", "depth: " + "9" * 5000 + "\n", ["integer of 5000 digits", "line 1"]),
    "yaml 101-digit integer": ("int.yaml", "name: x\ndepth: " + "9" * 101 + "\n", ["integer of 101 digits", "line 2"]),
    "json 5000-digit integer": ("int.json", '{"depth": ' + "9" * 5000 + "}", ["integer of 5000 digits"]),
    "yaml duplicate key": ("dup.yaml", "depth: 2\nname: x\ndepth: 3\n", ["duplicate key 'depth'", "line 3"]),
    "yaml nested duplicate key": ("dup.yaml", "attention:\n  name: mhsa\n  name: mhsa\n", ["duplicate key 'name'", "line 3"]),
    "json duplicate key": ("dup.json", '{"depth": 2,\n "name": "x",\n "depth": 3}', ["duplicate key 'depth'", "line 3"]),
    "yaml alias bomb": ("lol.yaml", "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['x'] * 10)}]\n" for i in range(9)),
        ["more than 100,000 values"]),
    "yaml recursive alias": ("rec.yaml", "a: &a [*a]\n", ["recursive alias"]),
    "yaml bad date": ("date.yaml", "name: 2001-13-45\n", ["invalid YAML value"]),
}


@pytest.mark.parametrize("case", PARSER_CASES)
def test_parser_limits_in_recipes(tmp_path, case):
    name, text, words = PARSER_CASES[case]
    path = tmp_path / name
    path.write_text(text)
    start = time.monotonic()
    line = one_error(invoke_cli("validate", path))
    assert time.monotonic() - start < QUICK
    assert line.startswith(f"error: {path}: ")
    for word in words:
        assert word in line, line


def test_parser_limits_leave_real_recipes_alone():
    from vitlab.recipes import parse_text

    deep = "a: " + "[" * 63 + "]" * 63  # 64 levels: the limit itself
    assert parse_text(deep)["a"]
    assert parse_text('{"a": ' + "[" * 63 + "]" * 63 + "}", json_syntax=True)["a"]
    merged = parse_text("base: &b {depth: 2, name: x}\nchild: {<<: *b, depth: 3}\n")  # '<<' overrides are fine
    assert merged["child"] == {"depth": 3, "name": "x"}
    assert parse_text("depth: " + "9" * 100)["depth"] == int("9" * 100)


def test_extends_chain_longer_than_the_limit(tmp_path):
    line = one_error(invoke_cli("validate", _chain(tmp_path, 40)))
    assert "a chain of more than 32 recipes" in line
    ok = tmp_path / "ok"
    ok.mkdir()
    assert vitlab.load_spec(_chain(ok, 32)).depth == 1  # the limit itself is fine


@pytest.mark.parametrize("value, words", [("9" * 5000, "integer of 5000 digits"), ("9" * 101, "integer of 101 digits"),
                                          ("[" * 5000, None), ("[" * 100 + "]" * 100, "nested deeper than 64")])
def test_override_values_have_the_same_limits(tmp_path, value, words):
    res = invoke_cli("validate", tiny_recipe(tmp_path), "--set", f"depth={value}")
    line = one_error(res)
    assert words is None or words in line, line


def test_recipe_larger_than_the_limit_is_refused_without_reading_it(tmp_path):
    sparse = tmp_path / "huge.yaml"
    with open(sparse, "wb") as fh:
        fh.truncate(8 << 30)  # 8 GiB of nothing: reading it whole would take minutes and all memory
    start = time.monotonic()
    line = one_error(invoke_cli("validate", sparse))
    assert time.monotonic() - start < QUICK
    assert "8,589,934,592 bytes" in line and "at most 1,048,576 bytes" in line
    just_over = tmp_path / "big.yaml"
    just_over.write_text("name: x\n" + "#" * (1 << 20) + "\n")
    assert "at most 1,048,576 bytes" in one_error(invoke_cli("validate", just_over))


# --- 4. one line per problem ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["validate"], ["missing argument 'RECIPES...'", "(see 'cli validate --help')"]),
    (["show", "--bogus", "x"], ["no such option", "--bogus", "(see 'cli show --help')"]),
    (["flops", "vit_tiny_patch16_224", "--format", "xx"], ["'xx' is not one of", "(see 'cli flops --help')"]),
    (["nope"], ["no such command 'nope'", "(see 'cli --help')"]),
    (["build", "vit_tiny_patch16_224", "--batch-size", "0"], ["--batch-size", "(see 'cli build --help')"]),
])
def test_usage_errors_are_one_line(args, words):
    line = one_error(invoke_cli(*args))
    for word in words:
        assert word in line, line


def test_usage_error_of_the_real_command(run_python):
    res = run_python("-m", "vitlab", "validate", env=subprocess_env(VITLAB_DISABLE_PLUGINS="1"))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == ["error: missing argument 'RECIPES...' (see 'vitlab validate --help')"]


def test_help_and_version_still_exit_0():
    assert invoke_cli("--version").exit_code == 0
    res = invoke_cli("validate", "--help")
    assert res.exit_code == 0 and "Usage:" in res.output


def test_file_names_with_a_newline_give_one_line(tmp_path):
    odd = tmp_path / "bad\nname"
    odd.mkdir()
    recipe = odd / "r\nx.yaml"
    recipe.write_text("depht: 2\n")
    ckpt = write_checkpoint(odd / "c\nk.safetensors", {**TINY, "depth": 10**12})
    # a missing name with a line break reads as recipe text (one line either way)
    one_error(invoke_cli("validate", tmp_path / "missing\nfile.yaml"))
    cases = [
        ["validate", recipe],
        ["show", recipe],
        ["attention", tiny_recipe(tmp_path), "--image", odd, "-o", tmp_path / "o.png"],  # click: a directory
        ["attention", tiny_recipe(tmp_path), "--image", tiny_image(tmp_path), "--weights", ckpt, "-o", tmp_path / "o.png"],
        ["schema", "-o", tmp_path / "no\nfolder" / "s.json"],
        ["flops", "vit_tiny_patch16_224", "-o", tmp_path / "no\nfolder" / "f.json"],
    ]
    for args in cases:
        line = one_error(invoke_cli(*args))
        assert "\\n" in line, line  # the name is there, escaped
    with pytest.raises(WeightsError) as info:
        vitlab.load(ckpt)
    assert "c\\nk.safetensors" in one_line(info.value)
    with pytest.raises(VitlabError) as info:
        load_image(odd)
    one_line(info.value)


# --- 5. output paths -------------------------------------------------------------------------------------------------

def _output_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    return {
        "parent is a file": (a_file / "out.json", "a_file is a file, not a folder"),
        "name too long": (tmp_path / ("n" * 300 + ".json"), "is too long for the file system"),
        "a directory": (a_dir, "is a directory"),
        "missing folder": (tmp_path / "nope" / "out.json", "does not exist"),
    }


@pytest.mark.parametrize("case", ["parent is a file", "name too long", "a directory", "missing folder"])
def test_output_paths_are_checked_before_work(tmp_path, case):
    path, words = _output_cases(tmp_path)[case]
    for force in (False, True):
        with pytest.raises(VitlabError) as info:
            check_output(path, force)
        assert words in one_line(info.value)
    with pytest.raises(VitlabError, match=words.split()[-1]):
        vitlab.save(vitlab.build_model(TINY), path, force=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = invoke_cli("flops", "vit_tiny_patch16_224", "--format", "json", "-o", path, "--force")
    one_error(res)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing left


@pytest.fixture()
def read_only_dir():
    """A folder nobody may write into, inside a folder anyone may enter (pytest's own temporary
    folders are private to their owner, and the check below may run as 'nobody')."""
    outer = Path(tempfile.mkdtemp(prefix="vitlab-ro-"))
    outer.chmod(0o755)
    ro = outer / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    yield ro
    ro.chmod(0o755)
    shutil.rmtree(outer)


def _as_nobody(run):
    """``run()``'s JSON-able result, computed in a forked child with the uid of 'nobody': root
    writes into any folder, so a read-only one can only be tested without root's rights."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown, just the answer
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            answer = run()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            answer = {"crash": repr(exc)}
        os.write(write, json.dumps(answer).encode())
        os._exit(0)
    os.close(write)
    data = b"".join(iter(lambda: os.read(read, 1 << 16), b""))
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_read_only_directory(read_only_dir):
    ro = read_only_dir
    target = ro / "s.json"

    def run():
        res = invoke_cli("schema", "-o", target)
        return {"code": res.exit_code, "stderr": res.stderr, "left": os.listdir(ro)}

    result = _as_nobody(run) if os.geteuid() == 0 else run()
    assert result.get("code") == 2, result
    assert result["stderr"].splitlines() == [f"error: cannot write {target}: folder {ro} is not writable"]
    assert result["left"] == []


def test_a_name_near_the_limit_still_writes(tmp_path):
    path = tmp_path / ("n" * 250 + ".json")  # 255 bytes: fits, though its temporary name must be shorter
    atomic_write(path, "{}")
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_ordinary_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        text = atomic_write(tmp_path / "a.json", "{}")
        png = atomic_write(tmp_path / "b.png", lambda tmp: save_png(procedural_image(8), tmp))
        ckpt = vitlab.save(vitlab.build_model(TINY), tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    for path in (text, png, ckpt):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


_SLOW_WRITER = """
import sys, time
from pathlib import Path
from vitlab.fileio import atomic_write

def slow(tmp):
    tmp.write_text("half of it")
    print("writing", flush=True)
    time.sleep(60)

atomic_write(Path(sys.argv[1]), slow)
"""


def test_sigterm_removes_the_temporary_file(tmp_path):
    out = tmp_path / "out" / "report.json"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=subprocess_env())
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert len(list(out.parent.iterdir())) == 1  # the temporary file, mid-write
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.wait()
    assert list(out.parent.iterdir()) == []


# --- 6. images ----------------------------------------------------------------------------------------------------

def _png(path: Path, width: int, height: int, rows: int | None = None) -> Path:
    """A real 1-bit PNG, streamed through zlib (a few KB even at 20000 x 20000). ``rows`` writes
    fewer rows than the header claims: a forged header over a tiny image."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height, rows", [
    (20000, 20000, None),  # a real bomb: 400 M pixels from a few KB; PIL's own limit
    (10000, 10000, None),  # PIL only warns here
    (9000, 9000, None),  # under PIL's limit, over vitlab's
    (100000, 100000, 1),  # a forged header over one row of data
])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, width, height, rows):
    path = _png(tmp_path / "bomb.png", width, height, rows)
    assert path.stat().st_size < 1 << 20
    start = time.monotonic()
    with pytest.raises(VitlabError) as info:  # a MemoryError would fail this test
        load_image(path)
    assert time.monotonic() - start < QUICK
    line = one_line(info.value)
    assert str(path) in line and ("decompression bomb" in line or f"{width}x{height}" in line)


def test_bomb_and_directory_through_the_cli(tmp_path):
    recipe = tiny_recipe(tmp_path)
    bomb = _png(tmp_path / "bomb.png", 20000, 20000)
    line = one_error(invoke_cli("attention", recipe, "--image", bomb, "-o", tmp_path / "o.png"))
    assert "decompression bomb" in line
    line = one_error(invoke_cli("attention", recipe, "--image", tmp_path, "-o", tmp_path / "o.png"))
    assert "is a directory" in line
    with pytest.raises(VitlabError, match="is a directory; give the image file"):
        load_image(tmp_path)


def test_ordinary_images_still_load(tmp_path):
    image = load_image(_png(tmp_path / "ok.png", 640, 480))
    assert image.shape == (3, 480, 640)


def test_a_staged_checkpoint_passes_the_size_checks(tmp_path):
    """Staged models number blocks globally; their tokens have the first stage's width and the
    head the last's: the checks must not refuse an honest file."""
    if "stages" not in vitlab.ViTSpec.model_fields:
        pytest.skip("this vitlab has no staged specs")
    staged = {"name": "staged", "img_size": 32, "patch_size": 8, "num_classes": 3,
              "stages": [{"depth": 1, "embed_dim": 16, "num_heads": 2}, {"depth": 2, "embed_dim": 32, "num_heads": 2}]}
    model = vitlab.build_model(staged, seed=0).eval()
    path = vitlab.save(model, tmp_path / "staged.safetensors")
    loaded = vitlab.load(path).eval()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # same weights; contiguous copies may take another summation order
        torch.testing.assert_close(loaded(x), model(x))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    wrong = {**model.spec.to_dict(), "stages": [{"depth": 10**12, "embed_dim": 16, "num_heads": 2},
                                                {"depth": 2, "embed_dim": 32, "num_heads": 2}]}
    wrong.pop("depth")
    with pytest.raises(WeightsError) as info:
        vitlab.load(write_checkpoint(tmp_path / "lies.safetensors", wrong, tensors))
    assert "vitlab_spec.stages hold 1000000000002 blocks in all but the file has tensors for 3 blocks" in one_line(info.value)
