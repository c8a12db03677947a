"""``ViTSpec``: the validated description of one ViT variant.

Global sizes are plain fields; each architectural axis is a ``ComponentSpec`` (``{name, params}``,
see ``vitlab.selection``) whose params are validated against the registered component's own
``Params`` model, with defaults filled in so that a dumped spec is complete; ``layers`` and
``stages`` override them per block and per stage. Cross-field constraints (width divisible by heads
where the attention splits it, patch grid, each component's own ``check``) run at validation time.

Names are looked up in the registry given in pydantic's validation context
(``ViTSpec.model_validate(data, context={"registry": reg})``); the spec keeps that registry
(``spec.registry``), and ``load_spec`` defaults it to the process registry.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import InitErrorDetails

from .kinds import BLOCK_KINDS, KINDS
from .compat import pairing_errors
from .context import BuildContext
from .errors import Problem, SpecError
from .layout import BlockPlan, StagePlan, apply_layers, at_spans
from .limits import LIMITS
from .parsing import parse_text
from .registry import Registry
from .selection import (
    ComponentSpec,
    LayerSpec,
    PartialSelection,
    StageSpec,
    error_detail,
    raise_errors,
    relocated,
    unknown_key_message,
    validate_selection,
)
from .sizes import NonNegInt, PosInt, Rate, Size2, as_pair

NO_REGISTRY = ("a ViTSpec is validated against a component registry: use vitlab.load_spec(data), or "
               "ViTSpec.model_validate(data, context={'registry': vitlab.load_registry()})")


def _context_registry(info: ValidationInfo) -> Registry:
    """The registry validation reads: the one in pydantic's validation context."""
    registry = info.context.get("registry") if isinstance(info.context, dict) else None
    if registry is None:
        raise TypeError(NO_REGISTRY)
    return registry


# Sizes beyond any model that can be built: a recipe past them is refused at validation, before
# anything (even a meta tensor, whose byte count overflows near 2**63) is made. ViT-22B uses
# depth 48, width 6144, MLP width 24576 and 1000 classes: each limit leaves orders of magnitude.


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
    transition: ComponentSpec = Field(
        ComponentSpec(name="pit_pool"), description="between stages, unless a stage names its own")

    stages: Optional[list[StageSpec]] = Field(
        None, min_length=1, max_length=LIMITS["depth"],  # each stage has a block: refused before validating 10**6
        description="a staged model: depth, embed_dim and num_heads per stage (the top-level ones follow)")
    layers: list[LayerSpec] = Field(
        default_factory=list, description="per-block overrides of attention, mlp, norm, block, mlp_ratio")

    # the registry this spec was validated against: its names and params mean what they mean there
    _registry: Optional[Registry] = PrivateAttr(None)

    def __eq__(self, other: Any) -> bool:
        """Equal recipes are equal specs, whichever registry validated them."""
        if not isinstance(other, ViTSpec):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  (params are mappings)

    # --- validation -------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _sizes_from_stages(cls, data: Any) -> Any:
        """With ``stages``, the top-level depth (total), embed_dim and num_heads (the last
        stage's: the width the head sees) follow from them unless the recipe states them."""
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
            return data
        stages = data["stages"]
        if len(stages) > LIMITS["depth"]:  # refused before a million entries are validated one by one
            raise ValueError(f"stages: {len(stages):,} stages are beyond what can be built "
                             f"(at most {LIMITS['depth']:,}: each has a block)")
        if not all(isinstance(st, dict) for st in stages):
            return data
        data = dict(data)
        depths = [st.get("depth") for st in stages]
        if "depth" not in data and all(isinstance(d, int) and not isinstance(d, bool) for d in depths):
            data["depth"] = sum(depths)
        for key in ("embed_dim", "num_heads"):
            if key not in data and key in stages[-1]:
                data[key] = stages[-1][key]
        return data

    @classmethod
    def from_yaml(cls, text: str, *, registry: Registry) -> "ViTSpec":
        """A spec from recipe text (YAML or JSON, e.g. ``dump_spec`` output), validated against
        ``registry``. Text names no file: ``extends`` is refused (``vitlab.load_spec`` reads files).

        Raises:
            SpecError: naming the field path, the bad value and the valid choices.
        """
        data = parse_text(text)
        if "extends" in data:
            raise SpecError([Problem("extends", "recipe text cannot extend another recipe; "
                                                "load a recipe file with vitlab.load_spec")])
        return cls.validated(data, registry)

    @classmethod
    def validated(cls, data: Any, registry: Registry, source: str | None = None) -> "ViTSpec":
        """``model_validate`` with ``registry`` in the context, raising ``SpecError`` (one problem
        per pydantic error, with field path, bad value and valid choices) instead of
        ``ValidationError``; ``source`` (a file name) prefixes each problem."""
        try:
            return cls.model_validate(data, context={"registry": registry})
        except ValidationError as exc:
            raise SpecError(spec_problems(exc), source=source) from None

    @field_validator(*KINDS, mode="after")
    @classmethod
    def _resolve_component(cls, sel: ComponentSpec, info: ValidationInfo) -> ComponentSpec:
        """Look the name up in the registry and validate params against its ``Params`` model."""
        return validate_selection(info.field_name, sel, _context_registry(info))

    @field_validator("stages", mode="after")
    @classmethod
    def _resolve_stages(cls, stages: list[StageSpec] | None, info: ValidationInfo) -> list[StageSpec] | None:
        if stages is None:
            return None
        registry, errors, out = _context_registry(info), [], []
        default = info.data.get("transition")
        for i, stage in enumerate(stages):
            if i == 0 and stage.transition is not None:
                errors.append(error_detail((0, "transition"), "the first stage follows the patch embedding: it has "
                                                        "no transition (give transitions to later stages)"))
            elif i > 0 and default is not None:
                try:
                    sel = validate_selection("transition", (stage.transition or PartialSelection()).over(default),
                                              registry, (i, "transition"))
                except ValidationError as exc:
                    errors.extend(relocated(exc))
                    sel = None
                stage = stage.model_copy(update={"transition": PartialSelection(name=sel.name, params=sel.params)
                                                 if sel is not None else stage.transition})
            out.append(stage)
        raise_errors(errors)
        return out

    @field_validator("layers", mode="after")
    @classmethod
    def _resolve_layers(cls, layers: list[LayerSpec], info: ValidationInfo) -> list[LayerSpec]:
        """Check ``at`` against the depth and resolve each override to a complete selection."""
        registry, errors, out = _context_registry(info), [], []
        depth = info.data.get("depth")
        for i, layer in enumerate(layers):
            if depth is not None and depth <= LIMITS["depth"]:  # past it, depth alone is the error
                try:
                    at_spans(layer.at, depth)
                except ValueError as exc:
                    errors.append(error_detail((i, "at"), str(exc), layer.at))
            update = {}
            for kind in BLOCK_KINDS:
                override, default = getattr(layer, kind), info.data.get(kind)
                if override is None or default is None:
                    continue
                try:
                    sel = validate_selection(kind, override.over(default), registry, (i, kind))
                except ValidationError as exc:
                    errors.extend(relocated(exc))
                    continue
                update[kind] = PartialSelection(name=sel.name, params=sel.params)
            out.append(layer.model_copy(update=update))
        raise_errors(errors)
        return out

    def _size_errors(self) -> list[InitErrorDetails]:
        """Sizes past ``LIMITS``: one error each, naming the limit."""
        sizes = {"depth": self.depth, "embed_dim": self.embed_dim,  # MLP widths: ``_mlp_width_errors``
                 "num_classes": self.num_classes, "reg_tokens": self.reg_tokens, "in_chans": self.in_chans,
                 "img_size": max(self.img_hw)}
        for i, st in enumerate(self.stages or []):
            sizes[f"stages.{i}.embed_dim"] = st.embed_dim
        errors = []
        for key, value in sizes.items():
            limit = LIMITS[key.rpartition(".")[2]]
            if value > limit:
                field = "mlp_ratio" if key.endswith("mlp_hidden_dim") else key.rpartition(".")[2]
                loc = tuple(int(p) if p.isdigit() else p for p in key.split("."))[:-1] + (field,)
                what = f"an MLP width of {value}" if field == "mlp_ratio" else f"{value}"
                errors.append(error_detail(loc, f"{what} is beyond what can be built (at most {limit:,})", value))
        return errors or self._mlp_width_errors()

    def _mlp_width_errors(self) -> list[InitErrorDetails]:
        """Each MLP ratio times the width of every stage it is used in gives an MLP of 1 to
        ``LIMITS["mlp_hidden_dim"]`` units, located at the ratio (global or a ``layers`` entry)."""
        dims = [st.embed_dim for st in self.stages] if self.stages else [self.embed_dim]
        stage_of = [i for i, st in enumerate(self.stages) for _ in range(st.depth)] if self.stages else None
        limit = LIMITS["mlp_hidden_dim"]
        checks = [(("mlp_ratio",), self.mlp_ratio, range(len(dims)))]
        for j, layer in enumerate(self.layers):
            if layer.mlp_ratio is None:
                continue
            try:  # a bad ``at`` has its own error; here only the stages it reaches matter
                runs = at_spans(layer.at, self.depth)
            except ValueError:
                continue
            # a run reaches the stages of its ends and every stage between them
            stages = {s for lo, hi in runs for s in range(stage_of[lo], stage_of[hi] + 1)} if stage_of else {0}
            checks.append((("layers", j, "mlp_ratio"), layer.mlp_ratio, sorted(stages)))
        errors = []
        for loc, ratio, stages in checks:  # the first bad stage of each ratio
            for i, width in ((i, int(dims[i] * ratio)) for i in stages):
                where = f" in stage {i}" if self.stages else ""
                if not 1 <= width <= limit:
                    errors.append(error_detail(loc, f"an MLP width of {width}{where} is beyond what can be built (at "
                                               f"most {limit:,})" if width > limit else f"embed_dim {dims[i]} * "
                                               f"mlp_ratio {ratio:g} gives an MLP width below 1{where}", ratio))
                    break
        return errors

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "ViTSpec":
        errors = self._size_errors()
        if errors:  # nothing below is safe to size with these
            raise_errors(errors)
        registry = _context_registry(info)
        errors += self._head_split_errors(registry)
        if self.stages is not None:
            for key, want in (("depth", sum(st.depth for st in self.stages)),
                              ("embed_dim", self.stages[-1].embed_dim), ("num_heads", self.stages[-1].num_heads)):
                if getattr(self, key) != want:
                    what = "the sum of the stages' depths" if key == "depth" else f"the last stage's {key}"
                    errors.append(error_detail((key,), f"{getattr(self, key)} disagrees with {what}, {want} "
                                                 "(leave it out: stages imply it)", getattr(self, key)))
        try:
            contexts = self.stage_contexts(registry, device="meta")
        except ValueError as exc:  # the patch embedder's grid check, or a transition's
            raise_errors(errors + [error_detail(("img_size",), str(exc), self.img_size)])
            return self
        if not errors:
            errors = self._check_components(registry, contexts)
        raise_errors(errors)
        self._registry = registry
        return self

    def _head_split_errors(self, registry: Registry) -> list[InitErrorDetails]:
        """A width its heads do not divide, where the stage's attention splits the width among them."""
        sizes = [((), self.embed_dim, self.num_heads, None)] if self.stages is None else [
            (("stages", i), st.embed_dim, st.num_heads, i) for i, st in enumerate(self.stages)]
        if all(d % h == 0 for _, d, h, _ in sizes):
            return []
        splitting = {p.stage if self.stages is not None else None for p in self.block_plans()
                     if registry.get("attention", p.selections["attention"].name).cls.splits_width}
        return [error_detail((*loc, "num_heads"), f"embed_dim {d} is not divisible by num_heads {h}", h)
                for loc, d, h, stage in sizes if d % h and stage in splitting]

    def _check_components(self, registry: Registry, contexts: list[BuildContext]) -> list[InitErrorDetails]:
        """Each used selection's own ``check`` in the context it is built in (once per distinct
        selection and context), located at the recipe entry that chose it."""
        uses: list[tuple[tuple, str, ComponentSpec, BuildContext]] = []
        first = contexts[0]
        for kind in ("patch_embed", "pos_embed"):
            uses.append(((kind,), kind, self.selection(kind), first))
        last = contexts[-1]
        uses += [(("norm",), "norm", self.norm, last), (("pool",), "pool", self.pool, last)]
        for plan in self.block_plans():
            ctx = contexts[plan.stage].replace(mlp_hidden_dim=plan.mlp_hidden_dim(contexts[plan.stage].embed_dim))
            for kind in BLOCK_KINDS:
                uses.append((plan.source[kind], kind, plan.selections[kind], ctx))
        for plan in self.stage_plans()[1:]:
            uses.append((("stages", plan.index, "transition"), "transition", plan.transition,
                         self.transition_context(contexts, plan.index)))
        errors, seen = [], set()
        for loc, kind, sel, ctx in uses:
            key = (loc, kind, sel.name, repr(sorted(sel.params.items())), ctx.embed_dim, ctx.num_heads,
                   ctx.grid_size, ctx.mlp_hidden_dim, ctx.in_dim)
            if key in seen:
                continue
            seen.add(key)
            info = registry.get(kind, sel.name)
            comp = info.cls
            from_plugin = "" if info.provider == "vitlab" else f" (plugin '{info.provider}')"
            where = f" in stage {ctx.stage_index}" if self.stages is not None and len(self.stages) > 1 else ""
            try:
                comp.check(ctx, comp.Params.model_validate(sel.params))
            except ValueError as exc:
                errors.append(error_detail(loc, f"{sel.name}{from_plugin}{where} {exc}", sel.name))
            except Exception as exc:  # a bug in foreign code: say whose, not a traceback
                errors.append(error_detail(loc, f"{sel.name}{from_plugin}: its check() raised {type(exc).__name__}: {exc}", sel.name))
        return errors + pairing_errors(self.pos_embed.name, self.block_plans(), registry)

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

    @property
    def registry(self) -> Registry:
        """The registry this spec was validated against (and that builds it by default)."""
        if self._registry is None:  # made without validation (``model_construct``)
            raise TypeError(NO_REGISTRY)
        return self._registry

    def selection(self, kind: str) -> ComponentSpec:
        """The recipe's default selection of ``kind`` (blocks may override it: ``block_plans``)."""
        return getattr(self, kind)

    # --- layout: stages and per-block selections ------------------------------------------------

    def stage_plans(self) -> list[StagePlan]:
        """The stages (one stage of ``depth`` blocks without ``stages``), without grids."""
        if self.stages is None:
            return [StagePlan(0, 0, self.depth, self.embed_dim, self.num_heads, None)]
        plans, start = [], 0
        for i, st in enumerate(self.stages):
            transition = None if i == 0 else ComponentSpec(name=st.transition.name, params=st.transition.params)
            plans.append(StagePlan(i, start, st.depth, st.embed_dim, st.num_heads, transition))
            start += st.depth
        return plans

    def block_plans(self) -> list[BlockPlan]:
        """Each block's stage, selections and MLP ratio, with the ``layers`` overrides applied
        (later entries win) and where each selection came from (for error locations)."""
        stage_of = [p.index for p in self.stage_plans() for _ in range(p.depth)]
        plans = [BlockPlan(i, stage_of[i], {k: self.selection(k) for k in BLOCK_KINDS}, self.mlp_ratio,
                           {k: (k,) for k in BLOCK_KINDS}) for i in range(self.depth)]
        entries = []
        for layer in self.layers:
            values = {k: ComponentSpec(name=sel.name, params=sel.params)
                      for k in BLOCK_KINDS if (sel := getattr(layer, k)) is not None}
            if layer.mlp_ratio is not None:
                values["mlp_ratio"] = layer.mlp_ratio
            entries.append((layer.at, values))
        apply_layers(plans, entries, self.depth)
        return plans

    def stage_contexts(self, registry: Registry | None = None, **alloc: Any) -> list[BuildContext]:
        """The build context of each stage: its width, heads, the grid it runs on (the patch
        embedder's for the first, each transition's ``out_grid`` after) and its prefix tokens
        (each transition's ``out_prefix``). Raises ``ValueError`` when a grid does not fit."""
        registry = registry if registry is not None else self.registry
        plans = self.stage_plans()
        contexts = [self.build_context(registry, **alloc)]  # the first stage's sizes
        for plan in plans[1:]:
            cls = registry.get("transition", plan.transition.name).cls
            params, prev = cls.Params.model_validate(plan.transition.params), contexts[-1]
            grid = tuple(cls.out_grid(prev.grid_size, params))
            if min(grid) < 1:
                raise ValueError(f"stage {plan.index} would have an empty {grid[0]}x{grid[1]} patch grid")
            class_token, reg_tokens = cls.out_prefix(prev.class_token, prev.reg_tokens, params)
            contexts.append(prev.replace(
                embed_dim=plan.embed_dim, num_heads=plan.num_heads, grid_size=grid, stage_index=plan.index,
                mlp_hidden_dim=int(plan.embed_dim * self.mlp_ratio), class_token=class_token, reg_tokens=reg_tokens))
        return contexts

    def transition_context(self, contexts: list[BuildContext], stage: int) -> BuildContext:
        """A transition is built with the context of the stage it leads into, the previous
        stage's width as ``in_dim`` and the grid and prefix tokens it receives."""
        prev = contexts[stage - 1]
        return contexts[stage].replace(in_dim=prev.embed_dim, grid_size=prev.grid_size,
                                       class_token=prev.class_token, reg_tokens=prev.reg_tokens)

    def build_context(self, registry: Registry | None = None, **alloc: Any) -> BuildContext:
        """The sizes of the model's input side (its first stage); see ``stage_contexts`` for all.
        Raises ``ValueError`` if the patch grid does not fit."""
        registry = registry if registry is not None else self.registry
        embed = registry.get("patch_embed", self.patch_embed.name).cls
        grid = embed.grid_size(self.img_hw, self.patch_hw, embed.Params.model_validate(self.patch_embed.params))
        first = self.stages[0] if self.stages else None
        return BuildContext(
            embed_dim=first.embed_dim if first else self.embed_dim,
            num_heads=first.num_heads if first else self.num_heads,
            mlp_hidden_dim=int(first.embed_dim * self.mlp_ratio) if first else self.mlp_hidden_dim,
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
        """Plain data (lists for pairs), every field that means something present: what
        ``dump_spec`` writes. A ``layers`` entry keeps only what it overrides (an unset kind is
        absent, not null, as the recipe schema wants), and ``transition`` is there only with
        ``stages``."""
        data = self.model_dump(mode="json")
        data["layers"] = [{k: v for k, v in layer.items() if v is not None} for layer in data["layers"]]
        default = type(self).model_fields["transition"].default.name
        if (self.stages is None and self.transition.name == default
                and self.transition.params == self.registry.get("transition", default).default_params()):
            del data["transition"]  # the stages' default transition means nothing without stages
        return data


def spec_problems(exc: ValidationError) -> list[Problem]:
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
