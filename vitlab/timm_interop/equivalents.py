"""Plugin twins in use: a timm module matched to the plugin component it twins by exact class
(``twin_of``), its params read (``read_twin``), its class bound for timm (``bound_layer``), and its
state-dict renames scoped to the blocks that use the component (``renames``). The declaration and
its registration checks are ``vitlab.twins``.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..twins import MODULE_PREFIX, SLOTS, TimmEquivalent, check_equivalent  # noqa: F401  (the twin API, re-exported)


def bound_layer(layer: Any) -> Any:
    """timm's Block wants its ``attn_layer`` as a class (it asks ``issubclass``): a ``partial`` of a
    class with keywords becomes a subclass whose constructor has those keywords bound, marked as
    the twin it binds so that reading it back still matches by exact class (``twin_of``)."""
    import functools

    if isinstance(layer, functools.partial) and isinstance(layer.func, type) and not layer.args:
        cls = layer.func
        return type(cls.__name__, (cls,), {"__init__": functools.partialmethod(cls.__init__, **layer.keywords),
                                           "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                           "__vitlab_twin_of__": cls})
    return layer


def twin_of(registry, kind: str, module: Any) -> TimmEquivalent | None:
    """The plugin-declared twin whose class ``module`` is exactly (or the subclass ``bound_layer``
    made of it), ``None`` if none: never by ``isinstance``, so a twin claims its own class only."""
    cls = type(module)
    cls = cls.__dict__.get("__vitlab_twin_of__", cls)
    return next((eq for eq in registry.timm_equivalents.values() if eq.kind == kind and eq.timm_type is cls), None)


def read_twin(eq: TimmEquivalent, module: Any) -> dict[str, Any]:
    """The params ``eq.read`` gives for ``module``; ``TypeError`` if the plugin returned anything
    but a mapping of param names (the reader turns it into a refusal naming the plugin)."""
    params = eq.read(module)
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise TypeError(f"its read() returned {type(params).__name__}, not a mapping of param names")
    return dict(params)


def renames(model):
    """One ``bridge.Family`` of the state-dict renames of the plugin twins ``model`` uses, each
    applied only to the blocks whose component it twins (``None`` if there are none): a plugin's
    renames never touch the keys of a model, or a block, that does not use its component."""
    from .bridge import Family

    twins = model.registry.timm_equivalents
    pairs = []
    for plan in model.spec.block_plans():
        for kind, sel in plan.selections.items():
            eq = twins.get((kind, sel.name))
            if eq is not None:
                pairs += [(t.replace("{block}", str(plan.index)), v.replace("{block}", str(plan.index)))
                          for t, v in eq.renames]
    return Family("plugin components", marker=r"(?!)", renames=tuple(pairs)) if pairs else None
