"""The docs run: README.md and docs/*.md are checked against the code they describe.

* docs/components.md is what ``scripts/components_doc.py`` generates from the built-in registry.
* Every fenced ``python`` block runs (in a temporary directory, on CPU), unless the line before it
  is ``<!-- not run: reason -->``.
* Every fenced ``yaml`` block that is a recipe (a mapping with ``name``) validates, against the
  built-ins plus the components the same page's Python blocks register and the repository's
  ``plugins/`` packages it may name.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import vitlab

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->$")
REPO_PLUGINS = ("vitlab_rope", "vitlab_convstem", "vitlab_efficient_attention")  # plugins/*/src/


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when the line before says so

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(lang: str, page: Path | None = None) -> list[Block]:
    out = []
    for path in [page] if page else PAGES:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) != lang:
                continue
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            marker = NOT_RUN.match(before)
            out.append(Block(path, text.count("\n", 0, m.start()) + 1, lang, m.group(2),
                             marker.group(1) if marker else None))
    return out


def run_block(block: Block) -> types.ModuleType:
    """Execute ``block`` as a module of its own (pydantic resolves annotations through
    ``sys.modules``); tracebacks point at the page's own line numbers."""
    name = f"vitlab_docs_{block.page.stem.lower()}_{block.line}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    code = compile("\n" * block.line + block.code, str(block.page), "exec")
    exec(code, module.__dict__)  # noqa: S102  (the repository's own docs)
    return module


# --- the generated components page --------------------------------------------------------------------

def _components_doc():
    spec = importlib.util.spec_from_file_location("components_doc", REPO / "scripts" / "components_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_components_page_is_current(builtin_registry):
    doc = _components_doc()
    assert (REPO / "docs" / "components.md").read_text() == doc.render(builtin_registry), (
        "docs/components.md is stale: run python scripts/components_doc.py --write")


def test_components_page_lists_every_builtin_once(builtin_registry):
    page = (REPO / "docs" / "components.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|", page, re.M)
    assert len(rows) == len(builtin_registry.components())
    for kind in vitlab.KINDS:
        section = page.split(f"\n## {kind}\n", 1)[1].split("\n## ", 1)[0]
        assert sorted(re.findall(r"^\| `(\w+)` \|", section, re.M)) == sorted(
            c.name for c in builtin_registry.components(kind))


@pytest.mark.parametrize("doc, expected", [
    ("Pre-norm. Then more.", "Pre-norm."),
    ("Scaled (Heo et al. 2021; timm ``pit.Pooling``). Second.", "Scaled (Heo et al. 2021; timm `pit.Pooling`)."),
    ("Wraps, e.g. A thing, over\n    two lines. Next.", "Wraps, e.g. A thing, over two lines."),
    ("No full stop\n\nSecond paragraph.", "No full stop"),
    ("Keeps 1.5 and x.y inside. Next", "Keeps 1.5 and x.y inside."),
])
def test_first_sentence_is_never_cut_inside(doc, expected):
    """``Component.describe`` (what ``vitlab components`` and this page show): the first sentence."""
    component = type("C", (vitlab.component.Component,), {"__doc__": doc})
    assert _components_doc().first_sentence(component) == expected


# --- Python blocks ---------------------------------------------------------------------------------------

PYTHON = blocks("python")


@pytest.mark.parametrize("block", [b for b in PYTHON if b.not_run is None], ids=lambda b: b.id)
def test_python_block_runs(block, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # files an example writes land here
    torch.manual_seed(0)
    run_block(block)


def test_pages_have_python_examples_that_run():
    """The marker is for fragments: each page with Python runs at least one block of it."""
    for page in {b.page for b in PYTHON}:
        assert any(b.not_run is None for b in PYTHON if b.page == page), f"{page.name}: every python block is 'not run'"


# --- YAML recipes ----------------------------------------------------------------------------------------

def _recipes() -> list[tuple[Block, dict]]:
    out = []
    for block in blocks("yaml"):
        data = yaml.safe_load(block.code)
        if isinstance(data, dict) and "name" in data and block.not_run is None:
            out.append((block, data))
    return out


@pytest.fixture(scope="module")
def docs_registry():
    """Built-ins, the repository's plugin packages (when installed) and every plugin the pages'
    Python blocks define, so a page's recipe may use the component it has just written."""
    plugins, missing = [], []
    for name in REPO_PLUGINS:
        try:
            plugins.append((name, importlib.import_module(name)))
        except ImportError:
            missing.append(name)
    for block in PYTHON:
        if block.not_run is None and "@vitlab.hookimpl" in block.code:
            plugins.append((block.id, run_block(block)))
    return vitlab.make_plugin_manager(entry_points=False, plugins=plugins)[1], missing


@pytest.mark.parametrize("block, data", [pytest.param(b, d, id=b.id) for b, d in _recipes()])
def test_yaml_recipe_validates(block, data, docs_registry, tmp_path):
    registry, missing = docs_registry
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(block.code)
    try:
        spec = vitlab.load_spec(path, registry=registry)
    except vitlab.SpecError as exc:
        if missing and ("provided by no installed plugin" in str(exc) or "which may provide it" in str(exc)):
            pytest.skip(f"needs a plugins/ package that is not installed ({', '.join(missing)})")
        raise
    assert spec.name == data["name"]


# --- the pages themselves --------------------------------------------------------------------------------

def test_readme_is_short_and_keeps_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert ("python3 dev.py compare   # install, then compare the bundled recipes" in text
            and "python3 dev.py test      # install with test extras" in text)  # .ci/run and a hook grep for it


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_module_map_names_every_module():
    """docs/architecture.md's module map lists each top-level module and package of vitlab/, and
    nothing that is gone."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w/.]+)` \|", section, re.M))
    root = REPO / "vitlab"
    present = {p.name for p in root.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    present |= {p.name + "/" for p in root.iterdir() if (p / "__init__.py").exists()}
    assert listed == present
