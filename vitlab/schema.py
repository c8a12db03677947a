"""A JSON Schema (draft 2020-12) of the recipe format, for editors and validators.

``recipe_schema()`` combines the global fields of ``ViTSpec`` with, for each component kind, the
choice among every *registered* component (built-ins and installed plugins):

* a bare name (``pos_embed: sincos2d``), one of the registered names;
* ``{name: NAME, params: {...}}`` where ``name`` is the constant ``NAME`` and ``params`` is that
  component's own ``Params`` schema (unknown keys refused, defaults and descriptions shown);
* ``{params: {...}}`` without a name, only in a recipe that ``extends`` another one (the params
  merge into the parent's selection, which this file cannot see).

``extends`` (a path or bundled recipe name) is allowed too. The schema checks what a file says,
not cross-field rules (width divisible by heads, a component's ``check``): ``vitlab validate`` does.

Editors that understand JSON Schema in YAML (e.g. the YAML language server) complete recipes with
``vitlab schema -o vitlab-recipe.schema.json`` and a first line
``# yaml-language-server: $schema=vitlab-recipe.schema.json``.
"""
from __future__ import annotations

import copy
from typing import Any

from .kinds import BLOCK_KINDS, KINDS
from .registry import Registry

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_REF_PREFIX = "#/$defs/"


def _hoist(schema: dict[str, Any], defs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Move ``schema``'s own ``$defs`` into ``defs`` under ``prefix`` and rewrite its ``$ref``s,
    so that many pydantic schemas can live in one document without name clashes."""
    schema = copy.deepcopy(schema)
    local = schema.pop("$defs", {})
    renames = {name: f"{prefix}{name}" for name in local}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str) and value.startswith(_REF_PREFIX):
                    target = value[len(_REF_PREFIX):]
                    out[key] = _REF_PREFIX + renames.get(target, target)
                else:
                    out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, sub in local.items():
        defs[renames[name]] = rewrite(sub)
    return rewrite(schema)


def component_schema(kind: str, registry: Registry, defs: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The choice of one ``kind``: a ``oneOf`` over a bare registered name, one
    ``{name: const, params: <Params schema>}`` branch per registered component, and the nameless
    ``{params}`` form of recipes that extend another."""
    names = registry.names(kind)
    branches: list[dict[str, Any]] = [{
        "type": "string",
        "enum": names,
        "description": f"a registered {kind} with its default params",
    }]
    for info in registry.components(kind):
        params = _hoist(info.params_schema(), defs, prefix=f"{kind}.{info.name}.")
        params.setdefault("title", f"{kind} '{info.name}' params")
        desc = info.description
        branches.append({
            "type": "object",
            "title": f"{kind}: {info.name}",
            "description": f"{desc} (provided by {info.provider})" if desc else f"provided by {info.provider}",
            "properties": {"name": {"const": info.name}, "params": params},
            "required": ["name"],
            "additionalProperties": False,
        })
    branches.append({
        "type": "object",
        "title": f"{kind}: params only",
        "description": "params merged into the selection of the recipe this one extends (needs 'extends')",
        "properties": {"params": {"type": "object"}},
        "required": ["params"],
        "additionalProperties": False,
    })
    out: dict[str, Any] = {"title": kind, "oneOf": branches}
    for key in ("description", "default"):
        if base and key in base:
            out[key] = base[key]
    out.setdefault("description", f"the {kind} component: one of {', '.join(names)}")
    return out


def recipe_schema(registry: Registry) -> dict[str, Any]:
    """The JSON Schema of a recipe file with every component in ``registry`` (``vitlab schema``
    passes the process one: built-ins plus installed plugins)."""
    from .spec import ViTSpec

    spec_schema = ViTSpec.model_json_schema()
    defs: dict[str, Any] = {}
    globals_ = _hoist({k: v for k, v in spec_schema.items() if k != "properties"} | {
        "properties": {k: v for k, v in spec_schema["properties"].items() if k not in KINDS},
    }, defs, prefix="ViTSpec.")
    properties: dict[str, Any] = {
        "extends": {
            "type": "string",
            "minLength": 1,
            "description": "a recipe this one builds on: a path relative to this file, or a bundled recipe's name",
        },
        **globals_["properties"],
    }
    for kind in KINDS:
        properties[kind] = component_schema(kind, registry, defs, base=spec_schema["properties"].get(kind))
    properties["layers"] = _layers_schema(registry, defs, spec_schema["properties"]["layers"])
    properties["stages"] = _stages_schema(registry, defs, spec_schema["properties"]["stages"])
    # $defs the ViTSpec schema had for the kinds (ComponentSpec) are no longer referenced
    used = _refs(properties) | _refs({k: v for k, v in defs.items()})
    defs = {k: v for k, v in defs.items() if k in used}
    schema: dict[str, Any] = {
        "$schema": DRAFT,
        "title": "vitlab recipe",
        "description": (spec_schema.get("description", "") + "\n\nGenerated by `vitlab schema` from the "
                        "installed components; cross-field rules are checked by `vitlab validate`.").strip(),
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        # a selection without a name only makes sense on top of an extended recipe
        "if": {"not": {"required": ["extends"]}},
        "then": {"properties": {kind: {"required": ["name"]} for kind in KINDS}},
    }
    if defs:
        schema["$defs"] = defs
    return schema


_POSITIVE_INT = {"type": "integer", "exclusiveMinimum": 0}


def _layers_schema(registry: Registry, defs: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``layers``: per-block overrides whose selections are the kinds' own choices (a bare name,
    ``{name, params}``, or ``{params}`` merged into the recipe's selection)."""
    item = {
        "type": "object",
        "properties": {
            "at": {"description": 'blocks across the whole model: an int, a list of ints, or "0-5,8" (a step: "1-11:2")',
                   "anyOf": [{"type": "integer", "minimum": 0},
                             {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                             {"type": "string", "pattern": r"^\s*\d+\s*(-\s*\d+\s*(:\s*\d+\s*)?)?(,\s*\d+\s*(-\s*\d+\s*(:\s*\d+\s*)?)?)*$"}]},
            **{kind: component_schema(kind, registry, defs) for kind in BLOCK_KINDS},
            "mlp_ratio": {"type": "number", "exclusiveMinimum": 0},
        },
        "required": ["at"],
        "additionalProperties": False,
    }
    return {"type": "array", "items": item, "description": base.get("description", "")}


def _stages_schema(registry: Registry, defs: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``stages``: depth, width and heads per stage, and the transition into each (after the first)."""
    item = {
        "type": "object",
        "properties": {"depth": _POSITIVE_INT, "embed_dim": _POSITIVE_INT, "num_heads": _POSITIVE_INT,
                       "transition": {"anyOf": [component_schema("transition", registry, defs), {"type": "null"}]}},
        "required": ["depth", "embed_dim", "num_heads"],
        "additionalProperties": False,
    }
    return {"anyOf": [{"type": "array", "items": item, "minItems": 1}, {"type": "null"}],
            "description": base.get("description", "")}


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_REF_PREFIX):
                found.add(value[len(_REF_PREFIX):])
            else:
                found |= _refs(value)
    elif isinstance(node, list):
        for v in node:
            found |= _refs(v)
    return found
