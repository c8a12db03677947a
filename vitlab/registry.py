"""The registry of named components: kind -> name -> (class, provider).

It is filled by calling every plugin's ``vitlab_register_components`` hook (see ``plugins.py``)
and is what validation, model building, the JSON schema and the CLI read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .component import KIND_BASES, KINDS, Component
from .errors import PluginError, known, unknown_choice

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ComponentInfo:
    """One registered component: its class and the plugin that provided it."""

    kind: str
    name: str
    cls: type[Component]
    provider: str

    @property
    def description(self) -> str:
        return self.cls.describe()

    @property
    def params_model(self):
        return self.cls.Params

    def params_schema(self) -> dict[str, Any]:
        """JSON schema of the component's params."""
        return self.cls.Params.model_json_schema()

    def default_params(self) -> dict[str, Any]:
        return self.cls.Params().model_dump(mode="json")


@dataclass(frozen=True)
class OpRule:
    """How FLOP reports count one traced operator (see ``vitlab_flop_handles``)."""

    op: str
    provider: str
    flops: Callable[[list, list], int] | None = None
    activations: Callable[[list, list], int] | None = None
    free: str | None = None


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or whose hook raised."""

    name: str
    distribution: str
    reason: str


@dataclass
class PluginInfo:
    """An external plugin distribution and what it registered."""

    name: str
    distribution: str
    version: str
    value: str
    components: list[tuple[str, str]] = field(default_factory=list)


class Registry:
    """Components by kind and name. ``register`` rejects duplicates naming both providers."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, ComponentInfo]] = {k: {} for k in KINDS}
        self.plugins: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []
        self.op_rules: dict[str, OpRule] = {}

    def register_op(self, op: str, provider: str, *, flops=None, activations=None, free: str | None = None) -> OpRule:
        """Declare how an operator is counted; a second declaration of ``op`` names both providers."""
        if not isinstance(op, str) or "::" not in op:
            raise PluginError(f"plugin '{provider}' declared FLOPs for {op!r}; expected a traced name like 'aten::elu'")
        if flops is None and activations is None and not free:
            raise PluginError(f"plugin '{provider}' declared {op} with neither a handle nor a reason it is free")
        for handle in (flops, activations):
            if handle is not None and not callable(handle):
                raise PluginError(f"plugin '{provider}' declared {op} with a handle that is not callable: {handle!r}")
        existing = self.op_rules.get(op)
        if existing is not None:
            raise PluginError(f"FLOPs of {op} are declared twice: by '{existing.provider}' and by '{provider}'")
        rule = OpRule(op, provider, flops, activations, free)
        self.op_rules[op] = rule
        return rule

    def register(self, cls: Any, provider: str) -> ComponentInfo:
        if not (isinstance(cls, type) and issubclass(cls, Component)):
            raise PluginError(
                f"plugin '{provider}' registered {cls!r}, which is not a component class "
                f"(subclass one of vitlab.{', vitlab.'.join(b.__name__ for b in KIND_BASES.values())})"
            )
        kind, name = cls.kind, cls.name
        if kind not in self._by_kind:
            raise PluginError(f"plugin '{provider}' registered {cls.__qualname__} with unknown kind {kind!r}; {known(KINDS)}")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(
                f"plugin '{provider}' registered {cls.__qualname__} with invalid name {name!r} "
                "(lower-case letters, digits and '_', starting with a letter)"
            )
        if not (isinstance(cls.Params, type) and hasattr(cls.Params, "model_validate")):
            raise PluginError(f"plugin '{provider}': {cls.__qualname__}.Params is not a pydantic model")
        existing = self._by_kind[kind].get(name)
        if existing is not None:
            raise PluginError(
                f"{kind} '{name}' is registered twice: by '{existing.provider}' "
                f"({existing.cls.__module__}.{existing.cls.__qualname__}) and by '{provider}' "
                f"({cls.__module__}.{cls.__qualname__})"
            )
        info = ComponentInfo(kind, name, cls, provider)
        self._by_kind[kind][name] = info
        return info

    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind))

    def get(self, kind: str, name: str) -> ComponentInfo:
        """The component, or ``KeyError`` with a message listing the known names."""
        table = self._kind(kind)
        if name not in table:
            raise KeyError(self.unknown_message(kind, name))
        return table[name]

    def unknown_message(self, kind: str, name: Any) -> str:
        table = self._kind(kind)
        return unknown_choice(kind, name, table, extra=", provided by no installed plugin")

    def components(self, kind: str | None = None) -> list[ComponentInfo]:
        kinds = [kind] if kind is not None else list(KINDS)
        return [self._kind(k)[n] for k in kinds for n in sorted(self._kind(k))]

    def __iter__(self) -> Iterator[ComponentInfo]:
        return iter(self.components())

    def __contains__(self, kind_name: tuple[str, str]) -> bool:
        kind, name = kind_name
        return name in self._by_kind.get(kind, {})

    def _kind(self, kind: str) -> dict[str, ComponentInfo]:
        try:
            return self._by_kind[kind]
        except KeyError:
            raise KeyError(unknown_choice("component kind", kind, KINDS)) from None
