"""timm model -> ``ViTSpec``: the family whose class the model is reads it (``families``; each
family's reader reads what the instance is, its modules, attributes and parameter shapes, never its
name).

Every feature vitlab cannot express raises ``SpecError`` naming that feature, so a converted spec
is always the same function as the timm model.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import SpecError, did_you_mean
from ..spec import ViTSpec
from .families import FAMILIES
from .reader import Unsupported

__all__ = ["Unsupported", "create_timm_model", "spec_from_timm"]


def _timm():
    import timm  # lazily: ``import vitlab`` never imports timm

    return timm


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``, on the meta device when possible (only the
    structure is needed, so even giant models cost nothing). Unknown names raise ``SpecError``."""
    timm = _timm()
    if not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise SpecError(f"unknown timm model '{name}'{hint}")
    kwargs = {"pretrained": False, **kwargs}
    if kwargs.get("pretrained"):
        raise SpecError("vitlab never downloads weights: create timm models with pretrained=False")
    try:
        return timm.create_model(name, device="meta", **kwargs)
    except TypeError:  # an entrypoint without device support: build it for real
        return timm.create_model(name, **kwargs)


def _family_of(model: nn.Module):
    """The family whose reader reads ``model``: the first that has its exact class (and accepts
    it), else the first with a base of its class (whose reader refuses the subclass by name)."""
    for exact in (True, False):
        for fam in FAMILIES:
            classes = fam.model_classes()
            hit = type(model) in classes if exact else isinstance(model, tuple(classes))
            if fam.reader is not None and hit and fam.accepts(model):
                return fam
    return None


def spec_from_timm(model_or_name: nn.Module | str, *, registry=None, **create_kwargs: Any) -> ViTSpec:
    """The ``ViTSpec`` of a timm ``VisionTransformer``, or of a ``PoolingVisionTransformer`` (PiT:
    a spec with ``stages``; see ``families.pit``), or of any model of the ``families``.

    Args:
        model_or_name: a timm ``VisionTransformer`` / ``PoolingVisionTransformer`` instance, or a
            timm model name (created with ``pretrained=False`` on the meta device: no weights are
            downloaded or allocated).
        registry: where the spec's components (and plugin twins) are looked up (default:
            ``vitlab.plugins.load_registry()``).
        create_kwargs: extra ``timm.create_model`` arguments when a name is given (``depth=2``).

    Raises:
        SpecError: the model is neither of those, or uses a feature vitlab cannot express (the
            message names it).
    """
    if isinstance(model_or_name, str):
        model = create_timm_model(model_or_name, **create_kwargs)
        name = model_or_name
        label = f"timm model '{name}'"
    else:
        if create_kwargs:
            raise TypeError("create_kwargs are only for a model name")
        model = model_or_name
        cfg = getattr(model, "pretrained_cfg", None) or {}
        name = cfg.get("architecture")
        label = f"timm model '{name}'" if name else f"timm {type(model).__name__}"
        name = name or f"timm_{type(model).__name__.lower()}"
    if registry is None:
        from ..plugins import load_registry

        registry = load_registry()
    family = _family_of(model)
    if family is None:
        raise SpecError(f"cannot convert {label}: {type(model).__name__} is not a timm VisionTransformer "
                        "(or PoolingVisionTransformer)")
    return family.reader(model, name, label, registry).spec()
