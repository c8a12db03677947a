"""vitlab: explore Vision Transformer architectures from small YAML recipes.

``import vitlab`` is light: every name below is imported on first use (torch with the first name
that needs it, timm and fvcore only by the functions that use them), so ``vitlab --help`` and
scripts that only read recipes start fast.
"""
from __future__ import annotations

from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it, imported on first access (PEP 562)
_EXPORTS = {
    **dict.fromkeys(("KINDS",), ".kinds"),
    **dict.fromkeys(("Attention", "Block", "Component", "Mlp", "Norm", "PatchEmbed", "Pool", "PosEncoding",
                     "Transition"), ".component"),
    "QKVAttention": ".components.attention",
    "BuildContext": ".context",
    **dict.fromkeys(("Linear", "drop_path", "layer_scale"), ".layers"),
    **dict.fromkeys(("PluginError", "SpecError", "VitlabError", "WeightsError"), ".errors"),
    "hookimpl": ".hookspecs",
    "VisionTransformer": ".model",
    **dict.fromkeys(("get_registry", "load_registry", "make_plugin_manager", "use_registry"), ".plugins"),
    **dict.fromkeys(("build_model", "dump_spec", "load_spec"), ".recipes"),
    **dict.fromkeys(("ComponentSpec", "ViTSpec"), ".spec"),
    **dict.fromkeys(("ForwardState", "QKTransform"), ".state"),
    "analyze": ".analysis",
    **dict.fromkeys(("spec_from_timm", "load_timm_weights", "timm_kwargs", "to_timm_state_dict", "timm_class"),
                    ".timm_interop"),
    "TimmEquivalent": ".twins",
    **dict.fromkeys(("register_timm_model", "register_timm_models"), ".timm_interop.register"),
    **dict.fromkeys(("save", "load"), ".checkpoint"),
    **dict.fromkeys(("attention_maps", "attention_rollout", "record_attention"), ".maps"),
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # once: later look-ups are plain attribute reads
        return value
    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        return import_module(f".{name}", __name__)  # a submodule (``vitlab.plugins``), as after an import
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def list_components(kind: str | None = None):
    """Registered components (``ComponentInfo``: kind, name, provider, description,
    ``params_schema()``), optionally of one kind."""
    from .plugins import load_registry

    return load_registry().components(kind)


__all__ = ["list_components", *_EXPORTS]

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .analysis import analyze
    from .checkpoint import load, save
    from .component import Attention, Block, Component, Mlp, Norm, PatchEmbed, Pool, PosEncoding, Transition
    from .components.attention import QKVAttention
    from .context import BuildContext
    from .errors import PluginError, SpecError, VitlabError, WeightsError
    from .hookspecs import hookimpl
    from .kinds import KINDS
    from .layers import Linear, drop_path, layer_scale
    from .maps import attention_maps, attention_rollout, record_attention
    from .model import VisionTransformer
    from .plugins import get_registry, load_registry, make_plugin_manager, use_registry
    from .recipes import build_model, dump_spec, load_spec
    from .spec import ComponentSpec, ViTSpec
    from .state import ForwardState, QKTransform
    from .timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict
    from .timm_interop.register import register_timm_model, register_timm_models
    from .twins import TimmEquivalent
