"""vitlab recipes as timm models: ``register_timm_models()`` registers every bundled recipe (the
plugin recipes among them, when their plugin is installed) with timm as ``vitlab_<recipe name>``,
so that ``timm.create_model`` and the training scripts built on it (timm's train.py, DeiT's
main.py) build them. The one line a training script adds::

    import vitlab; vitlab.register_timm_models()     # then --model vitlab_vit_tiny_patch16_224

``create_model`` honours what train.py passes: ``num_classes``, ``drop_rate``, ``drop_path_rate``,
``img_size``, ``in_chans``, ``global_pool`` (a pool vitlab has), any other ``ViTSpec`` field,
``attn_drop_rate`` (attention with dropout), ``device``/``dtype``, ``pretrained=False`` and
``checkpoint_path`` (a vitlab checkpoint: its keys are the model's).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Mapping

from ..errors import SpecError, VitlabError
from ..recipes import bundled_recipes, load_spec
from ..spec import ViTSpec
from ..timm_api import GLOBAL_POOLS, pretrained_cfg_of

__all__ = ["register_timm_model", "register_timm_models", "timm_model_name"]

# read by timm's ``register_model``: the pretrained cfg of each name registered here
default_cfgs: dict[str, dict[str, Any]] = {}
_SPECS: dict[str, ViTSpec] = {}  # registered name -> its spec, so registering again is a no-op
# ViTSpec fields a keyword may not replace wholesale (their own structure)
_STRUCTURED = ("stages", "layers")


def timm_model_name(recipe_name: str) -> str:
    """``vitlab_<recipe name>`` with anything but letters, digits and ``_`` made ``_``."""
    return "vitlab_" + re.sub(r"[^0-9A-Za-z_]+", "_", recipe_name).strip("_")


def spec_with(spec: ViTSpec, kwargs: dict[str, Any]) -> ViTSpec:
    """``spec`` with timm's ``create_model`` keywords applied (see the module docstring)."""
    data = spec.to_dict()
    kwargs = dict(kwargs)
    pool = kwargs.pop("global_pool", None)
    if pool is not None:
        name = GLOBAL_POOLS.get(pool, pool)
        if name != spec.pool.name:
            data["pool"] = {"name": name}
    attn_drop = kwargs.pop("attn_drop_rate", None)
    if attn_drop:
        if "attn_drop" not in spec.registry.get("attention", spec.attention.name).cls.Params.model_fields:
            raise TypeError(f"attn_drop_rate: attention '{spec.attention.name}' has no attention dropout")
        data["attention"] = {**data["attention"], "params": {**data["attention"].get("params", {}),
                                                             "attn_drop": attn_drop}}
    unknown = sorted(k for k in kwargs if k not in ViTSpec.model_fields or k in _STRUCTURED
                     or isinstance(data.get(k), dict))
    if unknown:
        known = sorted(k for k in ViTSpec.model_fields if k not in _STRUCTURED and not isinstance(data.get(k), dict))
        raise TypeError(f"vitlab model '{spec.name}' got unexpected keyword(s) {', '.join(unknown)}; "
                        f"it takes global_pool, attn_drop_rate and {', '.join(known)}")
    data.update({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    return ViTSpec.validated(data, spec.registry)


def _entrypoint(name: str, spec: ViTSpec):
    """timm's model entrypoint for ``spec``: ``(pretrained=False, **kwargs) -> model``."""

    def create(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
               cache_dir: Any = None, **kwargs: Any):
        from ..model import VisionTransformer

        if pretrained:
            raise ValueError(f"{name} has no pretrained weights: pass checkpoint_path=<vitlab checkpoint> "
                             "(vitlab from-timm NAME --weights FILE -o CHECKPOINT writes one)")
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        model = VisionTransformer(spec_with(spec, kwargs), device=device, dtype=dtype)
        cfg = dict(pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg or {})
        cfg.update(pretrained_cfg_overlay or {})
        model.pretrained_cfg = {**cfg, "architecture": name}
        return model

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"vitlab recipe '{spec.name}' (vitlab.register_timm_model)."
    return create


def register_timm_model(recipe: str | Path | Mapping[str, Any] | ViTSpec, name: str | None = None, *,
                        registry=None) -> str:
    """Register one recipe with timm and return its timm name.

    Args:
        recipe: a recipe path, bundled recipe name, mapping or ``ViTSpec``.
        name: the timm name (default: ``timm_model_name`` of the bundled name, the file's stem,
            or the spec's name).
        registry: where the recipe's components are looked up (default: ``load_registry()``).

    Raises:
        SpecError: the recipe is not valid.
    """
    from timm.models import register_model

    spec = recipe if isinstance(recipe, ViTSpec) else load_spec(recipe, registry=registry)
    if name is None:
        if isinstance(recipe, (str, Path)) and str(recipe) not in bundled_recipes():
            label = Path(recipe).stem
        elif isinstance(recipe, (str, Path)):
            label = str(recipe)
        else:
            label = spec.name
        name = timm_model_name(label)
    if name in _SPECS and _SPECS[name] == spec:
        return name
    default_cfgs[name] = {k: v for k, v in pretrained_cfg_of(spec).items() if k != "architecture"}
    entry = _entrypoint(name, spec)
    setattr(sys.modules[__name__], name, entry)
    register_model(entry)
    _SPECS[name] = spec
    return name


def register_timm_models(*, registry=None) -> list[str]:
    """Register every bundled recipe with timm as ``vitlab_<recipe name>`` (``plugins/x`` as
    ``vitlab_plugins_x``) and return the names. A plugin recipe whose plugin is not installed is
    left out."""
    if registry is None:
        from ..plugins import load_registry

        registry = load_registry()
    names = []
    for recipe in bundled_recipes():
        try:
            names.append(register_timm_model(recipe, registry=registry))
        except (SpecError, VitlabError):  # names a component of a plugin that is not installed
            continue
    return names
