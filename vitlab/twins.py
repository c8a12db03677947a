"""A plugin component's timm twin as declared through the ``vitlab_timm_equivalents`` hook, and the
checks a declaration passes at registration. Plain data and pure checks: the plugin loader uses
them without importing timm or the bridge; ``timm_interop.equivalents`` is how twins are used
(matched by exact class, read, written back, their renames scoped to their own blocks).

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


# the module of a component inside a block, in both timm's and vitlab's state-dict names: a twin's
# renames must stay under it, so they never touch keys of another component
MODULE_PREFIX: dict[str, str] = {"attention": "blocks.{block}.attn.", "mlp": "blocks.{block}.mlp.",
                                 "block": "blocks.{block}."}


def why_unclaimable(timm_type: Any) -> str | None:
    """Why ``timm_type`` may not be claimed as a twin (``None`` if it may): only a concrete
    ``nn.Module`` class of the plugin's own, matched by exact class, so nothing that ``isinstance``
    tricks (``object``, an ABC with ``__subclasshook__``, a metaclass with ``__instancecheck__``)
    or timm's and torch's own classes can take over modules of other models."""
    import inspect

    from torch import nn

    if not isinstance(timm_type, type):
        return f"timm_type {timm_type!r} is not a class"
    where = f"{timm_type.__module__}.{timm_type.__qualname__}"
    if timm_type.__module__.split(".")[0] in ("timm", "torch", "builtins", "vitlab"):
        return f"timm_type must be the plugin's own class, not {where}"
    if type(timm_type) is not type:  # ABCMeta and other metaclasses answer isinstance themselves
        return f"timm_type must be a plain concrete nn.Module class, not {where} (metaclass {type(timm_type).__name__})"
    if not issubclass(timm_type, nn.Module) or inspect.isabstract(timm_type):
        return f"timm_type must be a concrete nn.Module subclass, not {where}"
    return None


def check_equivalent(eq: Any, provider: str) -> TimmEquivalent:
    """``eq`` checked (``PluginError`` text without the provider if not), with its provider set.
    That the twin is the plugin's own class (the package of the component it twins) is checked
    when the plugin's registrations are committed (``Registry.commit``)."""
    from dataclasses import replace

    from .errors import PluginError

    if not isinstance(eq, TimmEquivalent):
        raise PluginError(f"registered {eq!r} as a timm equivalent, which is not a vitlab.TimmEquivalent")
    if eq.kind not in SLOTS:
        raise PluginError(f"timm equivalent of '{eq.name}': kind '{eq.kind}' is not one of {', '.join(SLOTS)}")
    if (why := why_unclaimable(eq.timm_type)) is not None:
        raise PluginError(f"timm equivalent of {eq.kind} '{eq.name}': {why}")
    if not (callable(eq.read) and callable(eq.layer)):
        raise PluginError(f"timm equivalent of {eq.kind} '{eq.name}': read and layer must be callables")
    if not all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in eq.renames):
        raise PluginError(f"timm equivalent of {eq.kind} '{eq.name}': renames must be (timm, vitlab) string pairs")
    prefix = MODULE_PREFIX[eq.kind]
    outside = [t for pair in eq.renames for t in pair if not t.startswith(prefix)]
    if outside:
        raise PluginError(f"timm equivalent of {eq.kind} '{eq.name}': rename '{outside[0]}' is not under the "
                          f"component's module '{prefix.rstrip('.')}'; renames apply to the component's own keys only")
    return replace(eq, provider=provider)
