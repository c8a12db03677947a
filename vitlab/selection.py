"""How a recipe chooses components: ``{name, params}`` selections validated against the registry,
and the per-block (``layers``) and per-stage (``stages``) entries that override them.

Errors are pydantic ``InitErrorDetails`` located at the recipe entry, so ``ViTSpec`` reports them
as ``layers.0.attention.params.kv_heads: ...``.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import unknown_choice
from .registry import Registry

PosInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]


def _size2_errors(value: Any, handler: Any) -> Any:
    """One clear message for a bad size instead of one per union member."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"expected a positive integer or [height, width] of positive integers, got {value!r}") from None


Size2 = Annotated[Union[PosInt, tuple[PosInt, PosInt]], WrapValidator(_size2_errors)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


def as_pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """A size given as one int or as (height, width) -> (height, width)."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _registry(info: ValidationInfo | None) -> Registry:
    if info is not None and isinstance(info.context, dict) and info.context.get("registry") is not None:
        return info.context["registry"]
    from .plugins import get_registry

    return get_registry()


def _error(loc: tuple, msg: str, value: Any = None) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("vitlab", msg), loc=loc, input=value)


def _raise(errors: list[InitErrorDetails], title: str = "ViTSpec") -> None:
    if errors:
        raise ValidationError.from_exception_data(title, errors)


def _relocate(exc: ValidationError) -> list[InitErrorDetails]:
    """The errors of a nested ``ValidationError`` as details to raise again (locations kept)."""
    return [_error(tuple(e["loc"]), e["msg"], e.get("input")) for e in exc.errors()]


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
        description='blocks across the whole model: an int, a list of ints, or "0-5,8"')

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


def _validate_selection(kind: str, sel: Any, registry: Registry, loc: tuple = ()) -> ComponentSpec:
    """A raw ``{name, params}`` -> ``ComponentSpec`` with params validated and defaults filled;
    raises ``ValidationError`` with locations under ``loc``."""
    sel = sel if isinstance(sel, ComponentSpec) else ComponentSpec.model_validate(sel)
    if (kind, sel.name) not in registry:
        _raise([_error(loc + ("name",), registry.unknown_message(kind, sel.name), sel.name)])
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
            errors.append(_error(loc + ("params",) + tuple(e["loc"]), msg, e.get("input")))
        _raise(errors)
    return ComponentSpec(name=sel.name, params=params.model_dump(mode="json"))
