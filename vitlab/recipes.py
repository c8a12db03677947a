"""Reading and writing recipes: YAML (or JSON) files, ``extends``, dotted overrides, dumping.

``load_spec`` is the one entry point: a path, a bundled recipe name, a mapping or a ``ViTSpec``,
plus ``overrides`` such as ``{"depth": 6, "attention.params.qk_norm": True}``.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from .component import KINDS
from .errors import Problem, SpecError, did_you_mean
# The parser limits live in .parsing; their names stay importable from here
# (``vitlab.recipes.load_json``, ``MAX_EXTENDS``, ...), and ``_read_text`` is looked up here at
# call time, so a test can watch every recipe file opened.
from .parsing import (  # noqa: F401  (re-exported)
    MAX_EXTENDS,
    MAX_INT_DIGITS,
    MAX_NESTING,
    MAX_RECIPE_BYTES,
    MAX_VALUES,
    load_json,
    load_yaml,
)
from .parsing import read_text as _read_text
from .spec import ComponentSpec, ViTSpec, unknown_key_message

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


def parse_text(text: str, source: str = "<recipe text>", json_syntax: bool = False) -> dict[str, Any]:
    """Recipe text (YAML, or JSON) -> raw mapping, with syntax errors naming line and column.
    YAML is read with the safe loader: no tags, no objects, no code. Both refuse what passes the
    limits of :mod:`vitlab.parsing` (nesting, repeated keys, huge integers, alias bombs)."""
    if not text.strip():
        raise SpecError("recipe file is empty", source=source)
    try:
        data = load_json(text) if json_syntax else load_yaml(text)
    except SpecError as exc:
        raise exc.with_source(source) from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", source=source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"invalid YAML{where}: {problem}", source=source) from None
    except ValueError as exc:  # a scalar that resolves to a type and then fails (2001-13-45 as a date)
        raise SpecError(f"invalid YAML value: {exc}", source=source) from None
    if data is None:
        raise SpecError("recipe file is empty (only comments)", source=source)
    if not isinstance(data, dict):
        raise SpecError(f"a recipe must be a mapping of fields, got {type(data).__name__}", source=source)
    return data


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


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a recipe file with its ``extends`` chain merged in (not yet validated)."""
    path = Path(path)
    real = path.resolve()
    if real in _chain:
        cycle = " -> ".join(str(p) for p in _chain + (real,))
        raise SpecError(f"extends cycle: {cycle}", source=str(path))
    if len(_chain) >= MAX_EXTENDS:
        raise SpecError(f"extends: a chain of more than {MAX_EXTENDS} recipes (the limit); started at {_chain[0]}",
                        source=str(path))
    data = _parse(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise SpecError(f"extends: expected a recipe path or bundled name, got {parent!r}", source=str(path))
    try:
        parent_path = find_recipe(parent, relative_to=path)
    except SpecError as exc:
        raise SpecError([Problem("extends", p.msg) for p in exc.problems], source=str(path)) from None
    return _merge(read_recipe(parent_path, _chain + (real,)), data)


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


def _problems(exc: ValidationError) -> list[Problem]:
    """pydantic errors -> one readable problem each, with field path, bad value and valid choices."""
    out = []
    for e in exc.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            if len(loc) == 1:
                msg = unknown_key_message(loc[0], list(ViTSpec.model_fields))
            elif len(loc) == 2 and loc[0] in KINDS:
                msg = unknown_key_message(loc[1], list(ComponentSpec.model_fields))
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif e["type"] != "vitlab" and "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        if e["type"] != "vitlab":
            msg = msg[0].lower() + msg[1:] if msg else msg
        path = ".".join(str(p) for p in loc if not (isinstance(p, str) and "[" in p))
        out.append(Problem(path, msg))
    return out


def validate(data: Mapping[str, Any], registry=None, source: str | None = None) -> ViTSpec:
    """Validate a raw mapping into a ``ViTSpec``; raise ``SpecError`` listing every problem."""
    context = {"registry": registry} if registry is not None else None
    try:
        return ViTSpec.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise SpecError(_problems(exc), source=source) from None


def load_spec(
    source: str | Path | Mapping[str, Any] | ViTSpec,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    *,
    registry=None,
    files: bool = True,
) -> ViTSpec:
    """A validated spec from a recipe path, bundled recipe name, mapping, or spec.

    Args:
        source: ``"recipes/x.yaml"``, ``"vit_tiny_patch16_224"`` (bundled), recipe text (a string
            with a line break, e.g. ``dump_spec`` output), a dict, or a ``ViTSpec``.
        overrides: dotted keys to values (``{"depth": 6}``) or ``"key=value"`` strings.
        registry: the component registry to validate against (default: installed plugins).
        files: ``False`` for a spec from untrusted data (a checkpoint's metadata): it must be a
            mapping, text or spec, and may not reference any file or bundled recipe (``extends``).

    Raises:
        SpecError: naming the file, the field path, the bad value and the valid choices.
    """
    label = None
    if not files:
        data = _data_without_files(source)
    elif isinstance(source, ViTSpec):
        data = source.to_dict()
    elif isinstance(source, Mapping) or _is_text(source):
        data = parse_text(source) if isinstance(source, str) else dict(source)
        if "extends" in data:
            parent = data.pop("extends")
            data = _merge(read_recipe(find_recipe(parent)), data)
    else:
        path = find_recipe(source)
        label = str(source)
        data = read_recipe(path)
    try:
        data = apply_overrides(data, overrides)
    except SpecError as exc:
        raise exc.with_source(label) if label else exc
    return validate(data, registry=registry, source=label)


def _is_text(source: Any) -> bool:
    """Recipe text rather than a name: a string with a line break, unless it names a file (a line
    break is a legal character in a file name)."""
    return isinstance(source, str) and "\n" in source and not os.path.isfile(source)


def _data_without_files(source: Any) -> dict[str, Any]:
    """The raw mapping of a spec that may not read files. ``extends`` is refused whatever its value:
    followed, it would open a file the data names (``/etc/shadow``) and quote it in the error."""
    if isinstance(source, ViTSpec):
        return source.to_dict()
    if isinstance(source, str) and "\n" in source:
        data = parse_text(source)
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise SpecError(f"expected a mapping or recipe text here, not a file or recipe name ({type(source).__name__})")
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
