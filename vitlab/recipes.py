"""Reading and writing recipes: YAML (or JSON) files, ``extends``, dotted overrides, dumping; and
building the model of one (``build_model``).

``load_spec`` is the one entry point: a path, a bundled recipe name, a mapping or a ``ViTSpec``,
plus ``overrides`` such as ``{"depth": 6, "attention.params.qk_norm": True}``. Recipe text goes
through ``ViTSpec.from_yaml``.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml

from .kinds import KINDS
from .errors import Problem, SpecError, did_you_mean
from .model import VisionTransformer
from .parsing import MAX_EXTENDS, MAX_RECIPE_BYTES, load_yaml, parse_text  # noqa: F401  (parse_text, MAX_RECIPE_BYTES re-exported)
from .parsing import read_text as _read_text  # looked up here at call time: a test watches every file opened
from .plugins import load_registry
from .registry import Registry
from .spec import ViTSpec

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
# Top-level sizes that a recipe's ``stages`` imply (see ``ViTSpec.stages``).
STAGE_DERIVED = ("depth", "embed_dim", "num_heads")


def recipes_dir() -> Path:
    """Where the bundled recipes live: inside an installed wheel, or the repository's ``recipes/``."""
    packaged = Path(__file__).parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


def bundled_recipes() -> dict[str, Path]:
    """Bundled recipe names (file stems, ``plugins/x`` for sub-folders) -> paths."""
    root = recipes_dir()
    if not root.is_dir():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in RECIPE_SUFFIXES and path.is_file():
            out[path.relative_to(root).with_suffix("").as_posix()] = path
    return out


def find_recipe(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe file by path (relative to ``relative_to``'s folder first) or bundled name."""
    ref_path = Path(ref)
    candidates = []
    if relative_to is not None and not ref_path.is_absolute():
        candidates.append(relative_to.parent / ref_path)
    candidates.append(ref_path)
    for c in candidates:
        if os.path.isfile(c):  # False, not an exception, for a name too long or a folder we cannot enter
            return c
    bundled = bundled_recipes()
    if str(ref) in bundled:
        return bundled[str(ref)]
    hint = did_you_mean(str(ref), bundled)
    where = f" relative to {relative_to.parent}" if relative_to is not None else ""
    raise SpecError(f"recipe '{ref}' not found: no such file{where} and no bundled recipe of that name{hint}")


def _parse(path: Path) -> dict[str, Any]:
    return parse_text(_read_text(path), source=str(path), json_syntax=path.suffix == ".json")


def _merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``. A component selection that changes ``name`` replaces the base's
    selection whole (its params belonged to the other component); otherwise params merge."""
    out = copy.deepcopy(base)
    if "stages" in child:
        # the stages define the sizes they imply; the base's plain sizes belonged to its own layout
        for key in STAGE_DERIVED:
            if key not in child:
                out.pop(key, None)
    for key, value in child.items():
        if key in KINDS:
            old, new = _as_selection(out.get(key)), _as_selection(value)
            if old is None or new is None or "name" in new and new.get("name") != old.get("name"):
                out[key] = copy.deepcopy(value)
            else:
                merged = {**old, **{k: v for k, v in new.items() if k != "params"}}
                if isinstance(old.get("params"), dict) and isinstance(new.get("params"), dict):
                    merged["params"] = {**old["params"], **new["params"]}
                elif "params" in new:
                    merged["params"] = new["params"]
                out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def _as_selection(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        return {"name": value}
    return dict(value) if isinstance(value, dict) else None


ALLOW_EXTENDS_OUTSIDE = "VITLAB_ALLOW_EXTENDS_OUTSIDE"  # "1": ``--allow-extends-outside`` for the process


def extends_outside_allowed() -> bool:
    """Whether ``extends`` may name a file outside the recipe's folder (``--allow-extends-outside``)."""
    return os.environ.get(ALLOW_EXTENDS_OUTSIDE, "") not in ("", "0")


def _check_inside(parent: Path, root: Path, ref: str, path: Path) -> None:
    """``extends`` stays in the top recipe's folder (sub-folders included) or the bundled recipes,
    unless allowed: a recipe from elsewhere must not make vitlab open any file it names."""
    real = parent.resolve()
    if real.is_relative_to(root) or real.is_relative_to(recipes_dir().resolve()):
        return
    raise SpecError([Problem("extends", f"'{ref}' is outside the recipe's folder ({root}) and the bundled "
                                        "recipes; pass --allow-extends-outside (or set "
                                        f"{ALLOW_EXTENDS_OUTSIDE}=1) to extend it")], source=str(path))


def _check_is_recipe(data: dict[str, Any], path: Path, child: Path) -> None:
    """An extended file's fields must all be recipe fields before anything of it reaches a message:
    an error never quotes a file that is not a recipe (``extends: /etc/shadow``)."""
    if any(not isinstance(k, str) or k not in ViTSpec.model_fields and k != "extends" for k in data):
        raise SpecError([Problem("extends", f"{path} is not a vitlab recipe (it has fields no recipe has; "
                                            "its content is not shown)")], source=str(child))


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = (), *, allow_outside: bool = False,
                _root: Path | None = None) -> dict[str, Any]:
    """The raw mapping of a recipe file with its ``extends`` chain merged in (not yet validated).
    Each ``extends`` must stay in ``path``'s folder or the bundled recipes unless ``allow_outside``."""
    path = Path(path)
    real = path.resolve()
    root = _root if _root is not None else real.parent
    if real in _chain:
        cycle = " -> ".join(str(p) for p in _chain + (real,))
        raise SpecError(f"extends cycle: {cycle}", source=str(path))
    if len(_chain) >= MAX_EXTENDS:
        raise SpecError(f"extends: a chain of more than {MAX_EXTENDS} recipes (the limit); started at {_chain[0]}",
                        source=str(path))
    try:
        data = _parse(path)
    except SpecError as exc:
        if not _chain:
            raise
        # a parse error of an extended file says where it failed, never what the file says
        at = re.search(r"line \d+(, column \d+)?", exc.problems[0].msg)
        raise SpecError([Problem("extends", f"{path} does not parse as a vitlab recipe"
                                            + (f" (at {at.group(0)})" if at else ""))], source=str(_chain[-1])) from None
    if _chain:
        _check_is_recipe(data, path, _chain[-1])
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise SpecError(f"extends: expected a recipe path or bundled name, got {parent!r}", source=str(path))
    try:
        parent_path = find_recipe(parent, relative_to=path)
    except SpecError as exc:
        raise SpecError([Problem("extends", p.msg) for p in exc.problems], source=str(path)) from None
    if not allow_outside:
        _check_inside(parent_path, root, parent, path)
    return _merge(read_recipe(parent_path, _chain + (real,), allow_outside=allow_outside, _root=root), data)


def parse_override(text: str) -> tuple[str, Any]:
    """``"attention.params.qk_norm=true"`` -> ``("attention.params.qk_norm", True)`` (YAML values)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"override '{text}' is not KEY=VALUE (e.g. depth=6 or attention.params.qk_norm=true)")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except SpecError as exc:  # a limit (a 5000-digit number) is refused, not read as text
        raise SpecError([Problem(key.strip(), p.msg) for p in exc.problems]) from None
    except (yaml.YAMLError, ValueError):
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """Set dotted keys in a raw recipe mapping. Changing ``<kind>.name`` drops that kind's old
    params unless the same overrides set them too."""
    if not overrides:
        return data
    if isinstance(overrides, str):
        overrides = [overrides]
    items = list(overrides.items()) if isinstance(overrides, Mapping) else [parse_override(o) for o in overrides]
    out = copy.deepcopy(data)
    # names first, so that params set in the same call land on the new component
    items.sort(key=lambda kv: 0 if kv[0].count(".") == 1 and kv[0].endswith(".name") else 1)
    for key, value in items:
        parts = key.split(".")
        if any(not p for p in parts):
            raise SpecError([Problem(key, "malformed override key")])
        if parts[0] in KINDS:
            sel = _as_selection(out.get(parts[0], getattr(ViTSpec.model_fields[parts[0]], "default").model_dump()))
            if sel is None:
                raise SpecError([Problem(parts[0], f"cannot set '{key}': {parts[0]} is not a mapping")])
            if parts[1:] == ["name"] and value != sel.get("name"):
                sel = {"name": value}
            out[parts[0]] = sel
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise SpecError([Problem(".".join(parts[: i + 1]), f"cannot set '{key}': not a mapping")])
            node = nxt
        node[parts[-1]] = value
    return out


def recipe_data(ref: str | Path) -> tuple[dict[str, Any], str]:
    """The raw mapping of a recipe file or bundled recipe (``extends`` merged in, not validated)
    and its label for messages: read once, a sweep validates it under many overrides."""
    return read_recipe(find_recipe(ref), allow_outside=extends_outside_allowed()), str(ref)


def load_spec(
    source: str | Path | Mapping[str, Any] | ViTSpec,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    *,
    registry: Registry | None = None,
    files: bool = True,
) -> ViTSpec:
    """A validated spec from a recipe path, bundled recipe name, mapping, or spec.

    Args:
        source: ``"recipes/x.yaml"``, ``"vit_tiny_patch16_224"`` (bundled), a dict, or a
            ``ViTSpec``. Recipe text (e.g. ``dump_spec`` output) goes through ``ViTSpec.from_yaml``.
        overrides: dotted keys to values (``{"depth": 6}``) or ``"key=value"`` strings.
        registry: the component registry to validate against (default: ``load_registry()``, the
            built-ins and the installed plugins).
        files: ``False`` for a spec from untrusted data (a checkpoint's metadata): it must be a
            mapping or spec, and may not reference any file or bundled recipe (``extends``).

    Raises:
        SpecError: naming the file, the field path, the bad value and the valid choices.
    """
    registry = registry if registry is not None else load_registry()
    label = None
    if not files:
        data = _data_without_files(source)
    elif isinstance(source, ViTSpec):
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = dict(source)
        if "extends" in data:
            parent = data.pop("extends")
            parent_path = find_recipe(parent)
            allow = extends_outside_allowed()
            if not allow:  # a mapping has no folder of its own: the working directory stands for it
                _check_inside(parent_path, Path.cwd().resolve(), parent, Path("<mapping>"))
            data = _merge(read_recipe(parent_path, (Path("<mapping>"),), allow_outside=allow,
                                      _root=Path.cwd().resolve()), data)
    else:
        data, label = recipe_data(source)
    try:
        data = apply_overrides(data, overrides)
    except SpecError as exc:
        raise exc.with_source(label) if label else exc
    return ViTSpec.validated(data, registry, source=label)


def _data_without_files(source: Any) -> dict[str, Any]:
    """The raw mapping of a spec that may not read files. ``extends`` is refused whatever its value:
    followed, it would open a file the data names (``/etc/shadow``) and quote it in the error."""
    if isinstance(source, ViTSpec):
        return source.to_dict()
    if not isinstance(source, Mapping):
        raise SpecError(f"expected a mapping here, not a file or recipe name ({type(source).__name__})")
    data = dict(source)
    if "extends" in data:
        raise SpecError([Problem("extends", "a spec from untrusted data (e.g. a checkpoint) cannot reference other files")])
    return data


def dump_spec(spec: ViTSpec) -> str:
    """The fully resolved spec as YAML (every field, defaults filled): ``load_spec`` reads it back
    to an equal spec."""
    data = spec.to_dict()
    for key in ("img_size", "patch_size"):  # keep [h, w] pairs on one line
        if isinstance(data[key], list):
            data[key] = list(data[key])
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def build_model(
    spec: ViTSpec | str | Mapping[str, Any],
    device=None,
    dtype=None,
    seed: int | None = None,
    *,
    registry: Registry | None = None,
) -> VisionTransformer:
    """Build the model of a spec (or recipe path / bundled name / mapping).

    Args:
        spec: a ``ViTSpec``, or anything ``load_spec`` accepts.
        device, dtype: allocation; ``"meta"`` builds without memory (parameter counts of 22B models).
        seed: makes initialisation deterministic without touching the global RNG state.
        registry: where a recipe's names are looked up (default: ``load_registry()``; a ``ViTSpec``
            is built with the registry it was validated against).
    """
    if not isinstance(spec, ViTSpec):
        spec = load_spec(spec, registry=registry)
    if seed is None:
        return VisionTransformer(spec, registry=registry, device=device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(spec, registry=registry, device=device, dtype=dtype)
