"""``TimmFamily``: everything vitlab knows about one timm family, as one object: the classes it
reads, its reader, its export (whether it claims a spec, then timm's class, ``create_model``
arguments and state dict), its state-dict tables and its load fixups. The families are listed once,
in order, in ``families``; ``spec_from``, ``to_timm`` and ``weights`` only walk that list.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .bridge import Family


@dataclass(frozen=True)
class TimmFamily:
    """One timm family.

    Args:
        name: the family, for messages.
        classes: ``"timm.models.module.Class"`` of every model class the family reads, matched
            exactly (a subclass is refused by the reader of its nearest base).
        reader: the ``reader.Reader`` subclass that reads those models (``None``: reads none).
        accepts: of a model of one of ``classes``, whether it is this family's (the hybrids are
            timm ``VisionTransformer``s with a CNN stem; default: every one).
        claims: whether a spec goes back to timm as this family (first claim wins, in list order).
        timm_class: the timm class of a claimed spec: ``"timm.models.module.Class"``, or
            ``(spec, exporting) -> `` the class.
        kwargs: ``(spec, exporting) -> `` the timm class's arguments for a claimed spec.
        state_dict: ``(model, exporting) -> `` the model's weights in timm's names.
        unkept: spec fields the timm class does not keep, so its model reads back without them.
        tables: the state-dict tables (``bridge.Family``) of the family's checkpoints, in the order
            their markers are tried on load; a ``SplitFamily``'s splits are planned by the loader.
        load_fixups: ``(plan) -> None``: what the tables cannot say, planned on load (``weights.Plan``).
    """

    name: str
    classes: tuple[str, ...] = ()
    reader: type | None = None
    accepts: Callable[[nn.Module], bool] = lambda model: True
    claims: Callable[[Any], bool] = lambda spec: False
    timm_class: str | Callable[[Any, "Exporting"], type] | None = None
    kwargs: Callable[[Any, "Exporting"], dict[str, Any]] | None = None
    state_dict: Callable[[Any, "Exporting"], dict[str, torch.Tensor]] | None = None
    unkept: tuple[str, ...] = ()
    tables: tuple[Family, ...] = ()
    load_fixups: Callable[[Any], None] | None = None

    def export_class(self, spec, ex: "Exporting") -> type:
        """The timm class a claimed ``spec`` goes back to timm as."""
        if callable(self.timm_class):
            return self.timm_class(spec, ex)
        module, _, cls = self.timm_class.rpartition(".")
        return getattr(importlib.import_module(module), cls)

    def model_classes(self) -> list[type]:
        """The timm classes of ``classes`` (those the installed timm has)."""
        out = []
        for dotted in self.classes:
            module, _, cls = dotted.rpartition(".")
            try:
                out.append(getattr(importlib.import_module(module), cls))
            except (ImportError, AttributeError):  # an older timm without this family's module
                continue
        return out


@dataclass(frozen=True)
class Exporting:
    """What an export is handed: the registry the spec's components come from, and the families
    (an export that writes part of a spec as another family's, the hybrids' and NaFlexVit's)."""

    registry: Any
    families: Sequence[TimmFamily]

    def family(self, spec) -> TimmFamily:
        """The first family that claims ``spec`` (the last one, timm's ``VisionTransformer``,
        claims every spec)."""
        return next(f for f in self.families if f.claims(spec))

    def timm_class(self, spec) -> type:
        return self.family(spec).export_class(spec, self)

    def kwargs(self, spec) -> dict[str, Any]:
        return self.family(spec).kwargs(spec, self)

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        return self.family(model.spec).state_dict(model, self)
