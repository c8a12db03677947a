"""``vitlab new-plugin``: write a ready-to-install plugin package for one component kind.

The package (distribution ``vitlab-NAME``, module ``vitlab_NAME``) has a ``pyproject.toml`` with
the entry point in the ``vitlab`` group, a component skeleton with a ``Params`` model and a
``check`` constraint, a recipe that uses it and a test. ``pip install -e DIR`` then ``pytest DIR``
passes as generated; the skeleton is a working starting point to edit. The files come from the
templates in ``vitlab/templates/plugin`` (``string.Template``: ``$name`` placeholders).
"""
from __future__ import annotations

import contextlib
import re
import shutil
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .kinds import KINDS
from .errors import VitlabError, path_label
from .registry import Registry

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
# The generated files are string.Template files in the package (vitlab/templates/plugin): one per
# generated file, plus per kind a component body (kinds/KIND.py.tmpl) and, where the recipe needs
# more than the shared sizes, extra recipe lines (kinds/KIND.recipe.yaml, e.g. a transition's
# stages). Placeholders: $dist, $module, $component, $entry_point, $cls, $kind, $vitlab_version,
# $body (the component) and $recipe_extra; a literal dollar is $$.
_TEMPLATES = ("templates", "plugin")


@dataclass(frozen=True)
class PluginNames:
    """The names one plugin name turns into."""

    name: str  # as given: "my-attn"
    kind: str
    dist: str  # vitlab-my-attn
    module: str  # vitlab_my_attn
    component: str  # my_attn: the name recipes use
    entry_point: str  # my_attn
    cls: str  # MyAttn

    @classmethod
    def of(cls, name: str, kind: str) -> "PluginNames":
        if kind not in KINDS:
            raise VitlabError(f"unknown kind '{kind}'; known: {', '.join(KINDS)}")
        if not _NAME_RE.match(name or ""):
            raise VitlabError(
                f"invalid plugin name {name!r}: use lower-case letters, digits, '-' and '_', starting with a letter"
            )
        base = name.removeprefix("vitlab-").removeprefix("vitlab_") or name
        ident = base.replace("-", "_")
        camel = "".join(part.capitalize() for part in ident.split("_") if part)
        return cls(name, kind, f"vitlab-{base}", f"vitlab_{ident}", ident, ident, camel or "Component")


def _template(*parts: str) -> string.Template:
    """A template file of ``vitlab/templates/plugin`` (read through importlib.resources, so it is
    found inside an installed wheel as well as in the repository)."""
    return string.Template(resources.files(__package__).joinpath(*_TEMPLATES, *parts).read_text(encoding="utf-8"))


def _files(n: PluginNames, vitlab_version: str) -> dict[str, str]:
    """Relative path -> text of every generated file."""
    subs = {
        "dist": n.dist, "module": n.module, "component": n.component, "entry_point": n.entry_point,
        "cls": n.cls, "kind": n.kind, "vitlab_version": vitlab_version,
    }
    extra = resources.files(__package__).joinpath(*_TEMPLATES, "kinds", f"{n.kind}.recipe.yaml")
    subs["recipe_extra"] = extra.read_text(encoding="utf-8") if extra.is_file() else ""
    # substitute() (not safe_substitute): a placeholder without a value is a bug in a template, not
    # text to leave in the generated package. Substituted values are not scanned again, so the
    # body may contain '$'.
    subs["body"] = _template("kinds", f"{n.kind}.py.tmpl").substitute(subs).strip("\n")
    return {
        "pyproject.toml": _template("pyproject.toml.tmpl").substitute(subs),
        "README.md": _template("README.md.tmpl").substitute(subs),
        f"src/{n.module}/__init__.py": _template("__init__.py.tmpl").substitute(subs),
        f"recipes/{n.component}.yaml": _template("recipe.yaml.tmpl").substitute(subs),
        f"tests/test_{n.module}.py": _template("test_plugin.py.tmpl").substitute(subs),
    }


def scaffold(name: str, kind: str, out_dir: str | Path | None = None, *, registry: Registry) -> list[Path]:
    """Write the plugin package for ``name`` / ``kind`` into ``out_dir`` (default ``./NAME``).

    Raises:
        VitlabError: bad name or kind, a component of that kind and name already registered,
            ``out_dir`` exists and is not empty, or cannot be written (nothing is left written then).
    """
    from . import __version__

    n = PluginNames.of(name, kind)
    if (kind, n.component) in registry:
        provider = registry.get(kind, n.component).provider
        raise VitlabError(f"{kind} '{n.component}' is already registered by '{provider}'; choose another plugin name")
    target = Path(out_dir) if out_dir is not None else Path(name)
    label = path_label(target)
    files = _files(n, __version__)  # rendered first: a broken template writes nothing
    try:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise VitlabError(f"{label} already exists and is not an empty directory; refusing to overwrite it "
                              "(choose another -o DIR)")
        # the outermost folder this call creates (None: target is an existing empty folder)
        created = next((p for p in reversed([target, *target.parents]) if not p.exists()), None)
        written = []
        try:
            for rel, text in files.items():
                path = target / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
                written.append(path)
        except OSError:
            # half a package is worse than none: remove what this call created
            for path in [created] if created is not None else list(target.iterdir()):  # it was empty before
                with contextlib.suppress(OSError):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            raise
    except OSError as exc:  # a read-only folder, a parent that is a file, a name too long
        raise VitlabError(f"cannot write {label}: {exc.strerror or exc}") from None
    return written
