"""Shared fixtures of vitlab's tests.

* Every test runs against a registry of vitlab's built-in components only, so whatever plugins
  happen to be installed in the environment never change a test's outcome (tests that exercise
  entry points build their own plugin manager, see ``plugin_dist`` / ``entry_point_registry``).
* ``tiny`` is the small spec most tests build on: 32 px images, 8 px patches (4 x 4 grid),
  width 32, 2 blocks, 2 heads, 10 classes.
* ``plugin_dist`` writes a real installed-looking distribution (a module plus a ``.dist-info``
  folder with ``entry_points.txt``) into a temporary directory on ``sys.path``, so the plugin is
  discovered by ``importlib.metadata`` exactly like a pip-installed one.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import vitlab
import vitlab.plugins

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent
PLUGIN_SOURCES = TESTS_DIR / "plugins"

TEST_DIST = "vitlab-testplugin"  # distribution name in METADATA
TEST_MODULE = "vitlab_testplugin"  # importable module
TEST_EP = "testplugin"  # entry-point name in the [vitlab] group

TINY = {
    "name": "tiny",
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 10,
}
TINY_PATCHES = (32 // 8) ** 2  # 16, computed here from the sizes, not read from vitlab


def invoke_cli(*args):
    """``vitlab ARGS`` through click's test runner (stderr kept apart from stdout)."""
    from click.testing import CliRunner

    from vitlab.cli import cli, load_commands

    load_commands()
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def one_error(res) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def repo_plugins() -> list[tuple[str, str, Path]]:
    """The plugin packages shipped in this repository (``plugins/<dist>/src/<module>``):
    (distribution, module, src folder)."""
    out = []
    for project in sorted((REPO / "plugins").glob("*/pyproject.toml")):
        src = project.parent / "src"
        for pkg in sorted(src.glob("*/__init__.py")):
            out.append((project.parent.name, pkg.parent.name, src))
    return out


@functools.lru_cache(maxsize=None)
def repo_registry():
    """Built-ins plus the repository's own plugins, imported from their sources (installed or
    not) and registered directly, never through whatever entry points are installed."""
    plugins = []
    for dist, module, src in repo_plugins():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            sys.path.append(str(src))
            mod = importlib.import_module(module)
        plugins.append((dist, mod))
    return vitlab.make_plugin_manager(entry_points=False, plugins=plugins)[1]


def pytest_configure(config):
    """Under xdist, each worker gets its share of the cores for torch's intra-op threads: two
    workers with every core each would oversubscribe the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def zoo_coverage():
    """``zoo_coverage(family)``: ``zoo.coverage`` of one timm family (every model built on meta,
    read, sent back to timm), computed once per session and shared by the tests that check it."""
    pytest.importorskip("timm")
    from timm_reference import family_coverage

    return family_coverage


@pytest.fixture(scope="session")
def builtin_registry():
    """A registry holding vitlab's built-in components and nothing else."""
    return vitlab.make_plugin_manager(entry_points=False)[1]


@pytest.fixture(autouse=True)
def _builtin_registry_only(builtin_registry):
    """Make the built-in registry the process-wide one for every test."""
    with vitlab.use_registry(builtin_registry):
        yield


@pytest.fixture
def tiny() -> dict:
    """A fresh copy of the tiny spec mapping (mutate freely)."""
    return dict(TINY)


@pytest.fixture
def run_cli():
    """``run_cli(*args, env=None)`` -> click ``Result`` of ``vitlab ARGS`` in this process.

    stderr is captured separately (``result.stderr``)."""
    from click.testing import CliRunner

    import vitlab.cli.spec_cmds  # noqa: F401  (registers the commands)
    from vitlab.cli import cli

    def run(*args: str, env: dict | None = None):
        return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=True)

    return run


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITLAB_")}
    env.update(extra)
    return env


@pytest.fixture
def run_python():
    """``run_python(*args, env=..., cwd=...)``: a fresh interpreter of the project venv."""

    def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, env=env or subprocess_env(),
            cwd=cwd or REPO, timeout=timeout,
        )

    return run


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch) -> Callable[..., Path]:
    """``plugin_dist(source)`` writes ``vitlab_testplugin.py`` (``source`` is a file name under
    ``tests/plugins`` or the module text) and ``vitlab_testplugin-0.1.dist-info/`` with
    ``METADATA`` and ``entry_points.txt``, puts the folder on ``sys.path`` and returns it."""
    site = tmp_path / "site"

    def make(source: str, *, dist: str = TEST_DIST, module: str = TEST_MODULE, ep: str = TEST_EP) -> Path:
        site.mkdir(exist_ok=True)
        src = PLUGIN_SOURCES / source
        text = src.read_text() if src.suffix == ".py" and src.is_file() else source
        (site / f"{module}.py").write_text(text)
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[vitlab]\n{ep} = {module}\n")
        monkeypatch.syspath_prepend(str(site))  # also invalidates importlib's finder caches
        monkeypatch.delitem(sys.modules, module, raising=False)
        importlib.invalidate_caches()
        return site

    yield make
    sys.modules.pop(TEST_MODULE, None)
    shutil.rmtree(site, ignore_errors=True)


@pytest.fixture
def only_test_entry_points(monkeypatch):
    """Let ``make_plugin_manager`` discover entry points through the real ``importlib.metadata``
    machinery, but keep only those of the test distributions (never whatever is installed)."""
    real = vitlab.plugins._entry_points

    def ours():
        return [ep for ep in real() if ep.dist is not None and ep.dist.name.startswith(TEST_DIST)]

    monkeypatch.setattr(vitlab.plugins, "_entry_points", ours)
    monkeypatch.delenv(vitlab.plugins.DISABLE_ENV, raising=False)
    return ours


@pytest.fixture
def fast_init(monkeypatch):
    """Replace ``torch.nn.init.trunc_normal_`` (erfinv-based, ~1 s for a ViT-B on a loaded CPU)
    by a clamped normal for tests that check shapes and finiteness, not initial statistics."""
    import torch

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        with torch.no_grad():
            return tensor.normal_(mean, std, generator=generator).clamp_(a, b)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", trunc_normal_)


@pytest.fixture
def single_thread():
    """One intra-op thread: the tiny models of these tests run faster without thread hand-offs,
    and the machine's cores are shared. Used by modules with ``pytestmark``."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def load_test_plugin(file: str):
    """A test plugin module of ``tests/plugins`` imported from its file (not through entry points)."""
    spec = importlib.util.spec_from_file_location(f"vitlab_test_{file[:-3]}", PLUGIN_SOURCES / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
