"""``ViTSpec``: the validated description of one ViT variant.

Global sizes are plain fields; each architectural axis is a ``ComponentSpec`` (``{name, params}``)
whose params are validated against the registered component's own ``Params`` model, with defaults
filled in so that a dumped spec is complete. Cross-field constraints (width divisible by heads,
patch grid, each component's own ``check``) run at validation time, not at build time.
"""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .component import KINDS
from .context import BuildContext
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


class ViTSpec(BaseModel):
    """A Vision Transformer variant. Defaults are ViT-B/16 at 224 px with 1000 classes, so a
    recipe states only what differs."""

    # validate_default: the default selections get their params filled in like written ones
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    name: str = "vit"
    img_size: Size2 = 224
    patch_size: Size2 = 16
    in_chans: PosInt = 3
    num_classes: NonNegInt = Field(1000, description="0 gives pooled features instead of logits")
    embed_dim: PosInt = 768
    depth: PosInt = 12
    num_heads: PosInt = 12
    mlp_ratio: Annotated[float, Field(gt=0.0, strict=True, allow_inf_nan=False)] = 4.0
    class_token: StrictBool = True
    reg_tokens: NonNegInt = Field(0, description="register tokens after the class token")
    pre_norm: StrictBool = Field(False, description="norm right after the embedding (CLIP's norm_pre)")
    final_norm: StrictBool = Field(True, description="norm over all tokens after the last block")
    dynamic_img_size: StrictBool = Field(False, description="accept other image sizes; resample positions")
    drop_rate: Rate = Field(0.0, description="dropout before the head")
    pos_drop_rate: Rate = Field(0.0, description="dropout after adding position embeddings")
    proj_drop_rate: Rate = Field(0.0, description="dropout after attention and MLP projections")
    drop_path_rate: Rate = Field(0.0, description="stochastic depth of the last block (linear from 0)")

    patch_embed: ComponentSpec = ComponentSpec(name="conv")
    pos_embed: ComponentSpec = ComponentSpec(name="learned")
    attention: ComponentSpec = ComponentSpec(name="mhsa")
    mlp: ComponentSpec = ComponentSpec(name="mlp")
    norm: ComponentSpec = ComponentSpec(name="layernorm")
    block: ComponentSpec = ComponentSpec(name="prenorm")
    pool: ComponentSpec = ComponentSpec(name="token")

    # --- validation -------------------------------------------------------------------------

    @field_validator(*KINDS, mode="after")
    @classmethod
    def _resolve_component(cls, sel: ComponentSpec, info: ValidationInfo) -> ComponentSpec:
        """Look the name up in the registry and validate params against its ``Params`` model."""
        kind = info.field_name
        registry = _registry(info)
        if (kind, sel.name) not in registry:
            _raise([_error(("name",), registry.unknown_message(kind, sel.name), sel.name)])
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
                errors.append(_error(("params",) + tuple(e["loc"]), msg, e.get("input")))
            _raise(errors)
        return ComponentSpec(name=sel.name, params=params.model_dump(mode="json"))

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "ViTSpec":
        errors: list[InitErrorDetails] = []
        if self.mlp_hidden_dim < 1:
            errors.append(_error(
                ("mlp_ratio",),
                f"embed_dim * mlp_ratio = {self.embed_dim * self.mlp_ratio:g} gives an MLP width below 1",
                self.mlp_ratio,
            ))
        if self.embed_dim % self.num_heads:
            errors.append(_error(
                ("num_heads",),
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
                self.num_heads,
            ))
        registry = _registry(info)
        try:
            ctx = self.build_context(registry, device="meta")
        except ValueError as exc:  # the patch embedder's grid check
            _raise(errors + [_error(("img_size",), str(exc), self.img_size)])
            return self
        if not errors:
            for kind in KINDS:
                sel: ComponentSpec = getattr(self, kind)
                info = registry.get(kind, sel.name)
                comp = info.cls
                from_plugin = "" if info.provider == "vitlab" else f" (plugin '{info.provider}')"
                try:
                    comp.check(ctx, comp.Params.model_validate(sel.params))
                except ValueError as exc:
                    errors.append(_error((kind,), f"{sel.name}{from_plugin} {exc}", sel.name))
                except Exception as exc:  # a bug in foreign code: say whose, not a traceback
                    errors.append(_error((kind,), f"{sel.name}{from_plugin}: its check() raised {type(exc).__name__}: {exc}", sel.name))
        _raise(errors)
        return self

    # --- derived sizes ----------------------------------------------------------------------

    @property
    def img_hw(self) -> tuple[int, int]:
        return as_pair(self.img_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return as_pair(self.patch_size)

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    def selection(self, kind: str) -> ComponentSpec:
        return getattr(self, kind)

    def build_context(self, registry: Registry | None = None, **alloc: Any) -> BuildContext:
        """The shared sizes components receive. Raises ``ValueError`` if the patch grid does not fit."""
        if registry is None:
            from .plugins import get_registry

            registry = get_registry()
        embed = registry.get("patch_embed", self.patch_embed.name).cls
        grid = embed.grid_size(self.img_hw, self.patch_hw, embed.Params.model_validate(self.patch_embed.params))
        return BuildContext(
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            mlp_hidden_dim=self.mlp_hidden_dim,
            img_size=self.img_hw,
            patch_size=self.patch_hw,
            in_chans=self.in_chans,
            grid_size=tuple(grid),
            class_token=self.class_token,
            reg_tokens=self.reg_tokens,
            depth=self.depth,
            proj_drop=self.proj_drop_rate,
            dynamic_img_size=self.dynamic_img_size,
            **alloc,
        )

    @property
    def num_tokens(self) -> int:
        return self.build_context().num_tokens

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists for pairs), every field present: what ``dump_spec`` writes."""
        return self.model_dump(mode="json")
