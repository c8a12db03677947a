"""vitlab: explore Vision Transformer architectures from small YAML recipes.

``import vitlab`` stays light: timm and fvcore are imported only by the functions that use them.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

from .component import (  # noqa: E402
    KINDS,
    Attention,
    Block,
    Component,
    Mlp,
    Norm,
    PatchEmbed,
    Pool,
    PosEncoding,
    Transition,
)
from .components.attention import QKVAttention  # noqa: E402
from .context import BuildContext  # noqa: E402
from .layers import Linear, drop_path, layer_scale  # noqa: E402
from .errors import PluginError, SpecError, VitlabError, WeightsError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .model import VisionTransformer, build_model  # noqa: E402
from .plugins import get_registry, make_plugin_manager, use_registry  # noqa: E402
from .recipes import dump_spec, load_spec  # noqa: E402
from .spec import ComponentSpec, ViTSpec  # noqa: E402
from .state import ForwardState, QKTransform  # noqa: E402

# Heavier features load on first use: name -> module that defines it.
_LAZY = {
    "analyze": ".analysis",
    "spec_from_timm": ".timm_interop",
    "load_timm_weights": ".timm_interop",
    "timm_kwargs": ".timm_interop",
    "to_timm_state_dict": ".timm_interop",
    "timm_class": ".timm_interop",
    "TimmEquivalent": ".timm_interop.equivalents",
    "save": ".checkpoint",
    "load": ".checkpoint",
    "attention_maps": ".maps",
    "attention_rollout": ".maps",
    "record_attention": ".maps",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")


def list_components(kind: str | None = None):
    """Registered components (``ComponentInfo``: kind, name, provider, description,
    ``params_schema()``), optionally of one kind."""
    return get_registry().components(kind)


__all__ = [
    "KINDS", "Attention", "Block", "BuildContext", "Component", "ComponentSpec", "ForwardState", "Linear", "Mlp",
    "Norm", "PatchEmbed", "PluginError", "Pool", "PosEncoding", "QKTransform", "QKVAttention", "SpecError",
    "Transition", "ViTSpec", "VisionTransformer", "drop_path", "layer_scale",
    "VitlabError", "WeightsError", "build_model", "list_components", "dump_spec", "get_registry",
    "hookimpl", "load_spec", "make_plugin_manager", "use_registry", *_LAZY,
]
