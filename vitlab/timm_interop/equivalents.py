"""A plugin component's timm twin, declared through the ``vitlab_timm_equivalents`` hook: the timm
module class it is read from and written back as, inside timm's ``VisionTransformer``.

timm's ``VisionTransformer`` takes its attention, MLP and block classes as arguments
(``attn_layer``, ``mlp_layer``, ``block_fn``), so a plugin that ships a timm-compatible module for
its component makes that component part of the bridge: ``spec_from_timm`` reads the module into the
component (``read``), ``timm_kwargs`` passes the class back (``layer``), and ``renames`` say how the
state-dict keys differ (the same templates as ``bridge.Family``, read both ways).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# the slots of timm's VisionTransformer a plugin may fill: vitlab kind -> timm_kwargs argument
SLOTS: dict[str, str] = {"attention": "attn_layer", "mlp": "mlp_layer", "block": "block_fn"}


@dataclass(frozen=True)
class TimmEquivalent:
    """How one plugin component maps to a timm module.

    Args:
        kind: ``"attention"``, ``"mlp"`` or ``"block"`` (see ``SLOTS``).
        name: the component's registered name (registered by the same plugin).
        timm_type: the plugin's own module class timm's model holds for it (instances of it and of
            its subclasses are read as the component; timm's and torch's classes are refused).
        read: ``module -> params`` of the component; raise ``ValueError`` naming the feature to refuse.
        layer: ``params -> `` what timm's ``VisionTransformer`` takes for the slot: the class, or a
            ``functools.partial`` of it with keywords (for attention, made a subclass binding them).
        renames: ``(timm template, vitlab template)`` state-dict pairs, ``{block}`` a block index and
            ``{rest}`` the rest of a name; empty when the component keeps timm's parameter names.
    """

    kind: str
    name: str
    timm_type: type
    read: Callable[[Any], dict[str, Any]]
    layer: Callable[[dict[str, Any]], Any]
    renames: tuple[tuple[str, str], ...] = ()
    provider: str = ""


def check_equivalent(eq: Any, provider: str) -> TimmEquivalent:
    """``eq`` checked (``PluginError`` text without the provider if not), with its provider set."""
    from dataclasses import replace

    from ..errors import PluginError

    if not isinstance(eq, TimmEquivalent):
        raise PluginError(f"registered {eq!r} as a timm equivalent, which is not a vitlab.TimmEquivalent")
    if eq.kind not in SLOTS:
        raise PluginError(f"timm equivalent of '{eq.name}': kind '{eq.kind}' is not one of {', '.join(SLOTS)}")
    if not isinstance(eq.timm_type, type):
        raise PluginError(f"timm equivalent of {eq.kind} '{eq.name}': timm_type {eq.timm_type!r} is not a class")
    if eq.timm_type.__module__.split(".")[0] in ("timm", "torch"):  # it would claim timm's own modules
        raise PluginError(f"timm equivalent of {eq.kind} '{eq.name}': timm_type must be the plugin's own class, "
                          f"not {eq.timm_type.__module__}.{eq.timm_type.__qualname__}")
    if not (callable(eq.read) and callable(eq.layer)):
        raise PluginError(f"timm equivalent of {eq.kind} '{eq.name}': read and layer must be callables")
    if not all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in eq.renames):
        raise PluginError(f"timm equivalent of {eq.kind} '{eq.name}': renames must be (timm, vitlab) string pairs")
    return replace(eq, provider=provider)


def renames(registry):
    """One ``bridge.Family`` of every plugin twin's state-dict renames, ``None`` if there are none."""
    from .bridge import Family

    pairs = tuple(p for eq in registry.timm_equivalents.values() for p in eq.renames)
    return Family("plugin components", marker=r"(?!)", renames=pairs) if pairs else None
