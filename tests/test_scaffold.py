"""``vitlab new-plugin``: the scaffolded package works as generated, for every kind."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid

import pytest
import torch

import vitlab
from vitlab.component import KINDS
from vitlab.scaffold import PluginNames, scaffold

from conftest import subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    import vitlab.cli.plugin_cmds  # noqa: F401  (registers the commands)
    from vitlab.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    return run


def _import_generated(root, module: str, monkeypatch):
    """Import the generated module from its src/ folder (no install). It goes into sys.modules
    while the test runs: pydantic resolves the Params annotations through the module."""
    spec = importlib.util.spec_from_file_location(module, root / "src" / module / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module, mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", KINDS)
def test_generated_component_of_every_kind_works(kind, tmp_path, monkeypatch):
    """In-process, per kind: the files, the hook, the recipe, a forward pass, the FLOP count
    (every operator counted or free), and refusal of unknown params."""
    name = f"sk-{kind.replace('_', '-')}"
    n = PluginNames.of(name, kind)
    root = tmp_path / name
    written = scaffold(name, kind, root, registry=vitlab.load_registry())
    assert sorted(p.relative_to(root).as_posix() for p in written) == sorted([
        "pyproject.toml", "README.md", f"src/{n.module}/__init__.py", f"recipes/{n.component}.yaml",
        f"tests/test_{n.module}.py",
    ])
    pyproject = (root / "pyproject.toml").read_text()
    assert f'name = "{n.dist}"' in pyproject and f'[project.entry-points.vitlab]\n{n.entry_point} = "{n.module}"' in pyproject
    mod = _import_generated(root, n.module, monkeypatch)
    _, registry = vitlab.make_plugin_manager(entry_points=False, plugins=[(n.entry_point, mod)])
    info = registry.get(kind, n.component)
    assert info.cls.Params.model_fields, "the skeleton declares at least one param"
    spec = vitlab.load_spec(root / "recipes" / f"{n.component}.yaml", registry=registry)
    with vitlab.use_registry(registry):
        model = vitlab.build_model(spec, seed=0).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        report = vitlab.analyze(spec, second_opinion=False)
    assert report.flops > 0 and not report.unsupported
    with pytest.raises(vitlab.SpecError, match="unknown parameter 'nope'"):
        vitlab.load_spec(root / "recipes" / f"{n.component}.yaml", {f"{kind}.params.nope": 1}, registry=registry)


@pytest.mark.slow
def test_new_plugin_installs_and_its_tests_pass(tmp_path, cli_runner):
    """End to end, as a plugin author: ``vitlab new-plugin``, ``pip install``, ``pytest``.

    The package is installed with ``pip install --no-deps --target SITE`` (a real PEP 517 build of
    the generated pyproject.toml through hatchling, entry point and all) into a folder of
    ``tmp_path`` that the test's interpreter gets on ``PYTHONPATH``: importlib.metadata finds the
    ``.dist-info`` there exactly as in site-packages. Nothing is installed into the project's venv,
    so a crashed run leaves no half-installed plugin behind for other tests, parallel workers or
    the next run, and cleanup is tmp_path's. (A throwaway venv would also work but costs a full
    copy of torch's environment; an editable install into the shared venv needs an uninstall that
    a killed run skips.)
    """
    name = f"e2e{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    res = cli_runner("new-plugin", name, "--kind", "attention", "-o", pkg)
    assert res.exit_code == 0, res.output
    assert f"created vitlab-{name} in {pkg}/" in res.output
    site = tmp_path / "site"
    env = subprocess_env()
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
         "--target", str(site), str(pkg)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (site / f"vitlab_{name}-0.1.0.dist-info" / "entry_points.txt").read_text().split() == [
        "[vitlab]", name, "=", f"vitlab_{name}",
    ]
    env["PYTHONPATH"] = str(site)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, env=env, cwd=pkg, timeout=300,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "4 passed" in tests.stdout


def test_new_plugin_default_directory_and_refusals(tmp_path, monkeypatch, cli_runner):
    monkeypatch.chdir(tmp_path)
    res = cli_runner("new-plugin", "fancy-pool", "--kind", "pool")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fancy-pool" / "src" / "vitlab_fancy_pool" / "__init__.py").is_file()
    assert "pip install -e fancy-pool" in res.output
    # an existing non-empty directory is never written into
    before = sorted(p.name for p in (tmp_path / "fancy-pool").rglob("*"))
    res = cli_runner("new-plugin", "fancy-pool", "--kind", "pool")
    assert res.exit_code == 2
    assert "fancy-pool already exists and is not an empty directory" in res.output
    assert sorted(p.name for p in (tmp_path / "fancy-pool").rglob("*")) == before
    # an empty one is fine
    (tmp_path / "empty").mkdir()
    assert cli_runner("new-plugin", "other", "--kind", "mlp", "-o", tmp_path / "empty").exit_code == 0
    # bad names, taken names, unknown kinds
    res = cli_runner("new-plugin", "Bad Name", "--kind", "mlp")
    assert res.exit_code == 2 and "invalid plugin name 'Bad Name'" in res.output
    res = cli_runner("new-plugin", "mhsa", "--kind", "attention")
    assert res.exit_code == 2 and "attention 'mhsa' is already registered by 'vitlab'" in res.output
    res = cli_runner("new-plugin", "x", "--kind", "attn")
    assert res.exit_code == 2 and "'attn' is not one of" in res.output
    assert not (tmp_path / "Bad Name").exists() and not (tmp_path / "mhsa").exists()


def test_plugin_names():
    n = PluginNames.of("my-attn", "attention")
    assert (n.dist, n.module, n.component, n.entry_point, n.cls) == (
        "vitlab-my-attn", "vitlab_my_attn", "my_attn", "my_attn", "MyAttn",
    )
    assert PluginNames.of("vitlab-foo", "mlp").dist == "vitlab-foo"  # no vitlab-vitlab-foo


def test_every_template_is_used_and_every_placeholder_filled(tmp_path):
    """The files come from vitlab/templates/plugin: each kind has its component body, no template
    is left unused, and no placeholder (``$name``) survives into a generated file."""
    import re
    from pathlib import Path

    import vitlab.scaffold

    root = Path(vitlab.scaffold.__file__).parent / "templates" / "plugin"
    templates = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert {f"kinds/{kind}.py.tmpl" for kind in KINDS} <= templates
    shared = {"pyproject.toml.tmpl", "README.md.tmpl", "__init__.py.tmpl", "recipe.yaml.tmpl", "test_plugin.py.tmpl"}
    kind_files = {t for t in templates if t.startswith("kinds/")}
    assert templates == shared | kind_files
    # a per-kind file for a kind that does not exist would never be read
    assert {t.removeprefix("kinds/").split(".")[0] for t in kind_files} <= set(KINDS)
    for kind in KINDS:
        for path in scaffold(f"ph-{kind.replace('_', '-')}", kind, tmp_path / kind, registry=vitlab.load_registry()):
            text = path.read_text()
            assert not re.search(r"\$\{?(dist|module|component|entry_point|cls|kind|vitlab_version|body|recipe_extra)\b",
                                 text), path


@pytest.mark.slow
def test_templates_ship_in_the_wheel(tmp_path):
    """A real wheel build of vitlab (hatchling, as `pip install vitlab` does) holds every template
    file: `vitlab new-plugin` works from an installed vitlab, not only from a checkout."""
    import zipfile
    from pathlib import Path

    import vitlab.scaffold

    repo = Path(vitlab.scaffold.__file__).resolve().parent.parent
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w",
         str(tmp_path), str(repo)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    (wheel,) = tmp_path.glob("vitlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    root = repo / "vitlab" / "templates"
    expected = {f"vitlab/templates/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file()}
    assert expected and expected <= names
