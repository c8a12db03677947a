"""How a recipe chooses components: ``{name, params}`` selections validated against the registry,
and the per-block (``layers``) and per-stage (``stages``) entries that override them.

Errors are pydantic ``InitErrorDetails`` located at the recipe entry, so ``ViTSpec`` reports them
as ``layers.0.attention.params.kv_heads: ...``.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import unknown_choice
from .registry import Registry
from .sizes import NonNegInt, PosInt, Rate, Size2, as_pair  # noqa: F401  (re-exported: recipes' size types)


def error_detail(loc: tuple, msg: str, value: Any = None) -> InitErrorDetails:
    """One validation error at ``loc`` (raised together with others by ``raise_errors``)."""
    return InitErrorDetails(type=PydanticCustomError("vitlab", msg), loc=loc, input=value)


def raise_errors(errors: list[InitErrorDetails], title: str = "ViTSpec") -> None:
    """Raise ``errors`` as one ``ValidationError``; nothing when there are none."""
    if errors:
        raise ValidationError.from_exception_data(title, errors)


def relocated(exc: ValidationError) -> list[InitErrorDetails]:
    """The errors of a nested ``ValidationError`` as details to raise again (locations kept)."""
    return [error_detail(tuple(e["loc"]), e["msg"], e.get("input")) for e in exc.errors()]


def unknown_key_message(key: Any, valid: list[str], what: str = "field") -> str:
    """``unknown field 'depht'; did you mean 'depth'? valid: ...``"""
    return unknown_choice(what, key, valid, label="valid")


class ComponentSpec(BaseModel):
    """The choice for one architectural axis: a registered ``name`` and its ``params``.

    In a recipe ``attention: {name: mhsa, params: {qk_norm: true}}``; a bare name
    (``pos_embed: sincos2d``) means default params.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class PartialSelection(BaseModel):
    """A per-block or per-stage override of a selection. Without ``name`` it keeps the default's
    component and merges ``params`` into the default's; with another name it replaces it whole."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optional[str] = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    def over(self, default: ComponentSpec) -> dict[str, Any]:
        """The raw selection this override makes of ``default`` (validated by the caller)."""
        if self.name is None or self.name == default.name:
            return {"name": default.name, "params": {**default.params, **self.params}}
        return {"name": self.name, "params": dict(self.params)}


class LayerSpec(BaseModel):
    """Overrides for some blocks: ``{at: "2,5,8,11", attention: mhsa}``. Later entries win."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    at: Union[NonNegInt, list[NonNegInt], str] = Field(
        description='blocks across the whole model: an int, a list of ints, or "0-5,8" (a step: "1-11:2")')

    @field_validator("at", mode="wrap")
    @classmethod
    def _one_message(cls, value: Any, handler: Any) -> Any:
        """One clear message for a bad ``at`` instead of one per union member."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f'expected a block index, a list of them or a string like "0-5,8", got {value!r}') from None
    attention: Optional[PartialSelection] = None
    mlp: Optional[PartialSelection] = None
    norm: Optional[PartialSelection] = None
    block: Optional[PartialSelection] = None
    mlp_ratio: Optional[Annotated[float, Field(gt=0.0, strict=True, allow_inf_nan=False)]] = None


class StageSpec(BaseModel):
    """One stage of a staged (hierarchical) model: its blocks, width and heads, and the
    transition that leads into it from the previous stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: PosInt
    embed_dim: PosInt
    num_heads: PosInt
    transition: Optional[PartialSelection] = Field(
        None, description="how the previous stage's tokens become this stage's; null = the recipe's transition")


def validate_selection(kind: str, sel: Any, registry: Registry, loc: tuple = ()) -> ComponentSpec:
    """A raw ``{name, params}`` -> ``ComponentSpec`` with params validated and defaults filled;
    raises ``ValidationError`` with locations under ``loc``."""
    sel = sel if isinstance(sel, ComponentSpec) else ComponentSpec.model_validate(sel)
    if (kind, sel.name) not in registry:
        raise_errors([error_detail(loc + ("name",), registry.unknown_message(kind, sel.name), sel.name)])
    params_model = registry.get(kind, sel.name).cls.Params
    try:
        params = params_model.model_validate(sel.params)
    except ValidationError as exc:
        valid = list(params_model.model_fields)
        errors = []
        for e in exc.errors():
            msg = e["msg"]
            if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
                msg = unknown_choice("parameter", e["loc"][0], valid, label="valid", extra=f" for {kind} '{sel.name}'")
            elif "input" in e and not isinstance(e["input"], (dict, list)):
                msg = f"{msg[0].lower()}{msg[1:]} (got {e['input']!r})"
            errors.append(error_detail(loc + ("params",) + tuple(e["loc"]), msg, e.get("input")))
        raise_errors(errors)
    return ComponentSpec(name=sel.name, params=params.model_dump(mode="json"))
