"""vitlab -> timm: the timm class, ``create_model`` arguments and state dict of the timm model
equivalent to a spec, from the first family that claims it (``families``), so a model built here
can be handed to timm."""
from __future__ import annotations

from typing import Any

import torch

from ..spec import ViTSpec
from .families import FAMILIES
from .family import Exporting


def _exporting(registry) -> Exporting:
    if registry is None:
        from ..plugins import load_registry

        registry = load_registry()
    return Exporting(registry, FAMILIES)


def _spec(spec: ViTSpec | Any, registry) -> ViTSpec:
    if isinstance(spec, ViTSpec):
        return spec
    from ..recipes import load_spec

    return load_spec(spec, registry=registry)


def unkept_fields(spec: ViTSpec) -> tuple[str, ...]:
    """The fields of ``spec`` that its timm equivalent does not keep (``TimmFamily.unkept``)."""
    return Exporting(None, FAMILIES).family(spec).unkept


def timm_kwargs(spec: ViTSpec | Any, *, registry=None) -> dict[str, Any]:
    """Keyword arguments of the timm model equivalent to ``spec``.

    Every architectural argument is given, so both the class (``timm_class(spec)(**kw)``) and
    ``timm.create_model(<any name of that class>, pretrained=False, **kw)`` build the same model: a
    timm ``VisionTransformer`` for a plain ViT, a ``PoolingVisionTransformer`` for a spec with
    ``stages`` (any ``pit_*`` name), and each family's own class for its specs. Load its weights
    with ``to_timm_state_dict``.

    Args:
        spec: a ``ViTSpec``, or what ``load_spec`` takes.
        registry: where the spec's components and plugin twins are looked up (default:
            ``vitlab.plugins.load_registry()``).

    Raises:
        SpecError: the spec uses something the timm class cannot express (named).
    """
    ex = _exporting(registry)
    return ex.kwargs(_spec(spec, ex.registry))


def timm_class(spec: ViTSpec | Any, *, registry=None) -> type:
    """The timm class ``timm_kwargs(spec)`` are for: ``VisionTransformer``, DeiT's
    ``VisionTransformerDistilled`` (pool ``distilled``), PiT's ``PoolingVisionTransformer`` (a spec
    with ``stages``), or the class of the family that claims the spec."""
    ex = _exporting(registry)
    return ex.timm_class(_spec(spec, ex.registry))


def to_timm_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of a vitlab model in timm's names, for ``timm_kwargs(model.spec)``'s model.

    Raises:
        SpecError: the spec has no timm equivalent.
        WeightsError: a weight timm's model has no place for is non-zero.
    """
    return _exporting(model.registry).state_dict(model)
