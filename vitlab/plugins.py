"""The plugin manager: hookspecs, built-ins, entry points, then ``check_pending()``.

Built-in components are registered exactly like outside plugins: ``vitlab.components`` is a
plugin module implementing ``vitlab_register_components``.

``VITLAB_DISABLE_PLUGINS=1`` skips every external plugin; a comma list
(``VITLAB_DISABLE_PLUGINS=rope,vitlab-convstem``) skips those entry-point or distribution names.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import os
from typing import Iterable, Iterator

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import PluginFailure, PluginInfo, Registry

ENTRY_POINT_GROUP = "vitlab"
DISABLE_ENV = "VITLAB_DISABLE_PLUGINS"
BUILTIN = "vitlab"


def disabled_plugins() -> set[str] | bool:
    """``True`` when all external plugins are disabled, else the set of disabled names."""
    value = os.environ.get(DISABLE_ENV, "").strip()
    if value.lower() in {"1", "true", "yes", "all", "*"}:
        return True
    return {v.strip() for v in value.split(",") if v.strip()}


def _is_disabled(ep: importlib.metadata.EntryPoint, disabled: set[str] | bool) -> bool:
    if disabled is True:
        return True
    dist = ep.dist.name if ep.dist is not None else ""
    return bool({ep.name, dist, dist.replace("-", "_")} & disabled)  # type: ignore[operator]


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def make_plugin_manager(
    *, entry_points: bool = True, plugins: Iterable[tuple[str, object]] = (), strict: bool = True
) -> tuple[pluggy.PluginManager, Registry]:
    """Build the plugin manager and the registry it fills.

    Args:
        entry_points: load external plugins from the ``vitlab`` entry-point group.
        plugins: extra ``(name, plugin)`` pairs registered after the entry points (tests use this).
        strict: raise ``PluginError`` for a plugin that fails to load; otherwise record it in
            ``registry.failures`` and go on (``vitlab plugins`` shows them).
    """
    components = importlib.import_module("vitlab.components")  # built-ins, registered like any plugin

    pm = pluggy.PluginManager("vitlab")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    pm.register(components, name=BUILTIN)

    def fail(name: str, dist: str, reason: str) -> None:
        if strict:
            raise PluginError(
                f"plugin '{name}' from distribution '{dist}' failed: {reason} "
                f"(set {DISABLE_ENV}={name} to skip it)"
            )
        registry.failures.append(PluginFailure(name, dist, reason))

    if entry_points:
        disabled = disabled_plugins()
        for ep in _entry_points():
            if _is_disabled(ep, disabled):
                continue
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of foreign code
                fail(ep.name, dist, f"import of '{ep.value}' raised {type(exc).__name__}: {exc}")
                continue
            if pm.is_registered(plugin) or pm.get_plugin(ep.name) is not None:
                fail(ep.name, dist, f"'{ep.value}' is already registered under another name")
                continue
            try:
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # pluggy rejects malformed hook implementations
                fail(ep.name, dist, f"{type(exc).__name__}: {exc}")
                continue
            registry.plugins.append(PluginInfo(ep.name, dist, version, ep.value))
    for name, plugin in plugins:
        pm.register(plugin, name=name)
        registry.plugins.append(PluginInfo(name, name, "", repr(plugin)))
    try:
        pm.check_pending()  # a misspelled vitlab_* hook fails here, at start-up
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{exc.plugin}' implements an unknown hook: {exc}") from None

    infos = {p.name: p for p in registry.plugins}
    hooks = (
        (pm.hook.vitlab_register_components, lambda provider, info: functools.partial(_register_one, registry, provider, info)),
        (pm.hook.vitlab_flop_handles, lambda provider, info: functools.partial(registry.register_op, provider=provider)),
    )
    for hook, make_register in hooks:
        # registration order: built-ins first, so a duplicate names the built-in as the first provider
        for impl in hook.get_hookimpls():
            name = impl.plugin_name
            info = infos.get(name)
            provider = BUILTIN if name == BUILTIN else (info.distribution if info and info.distribution != name else name)
            try:
                impl.function(register=make_register(provider, info))
            except PluginError as exc:
                if strict:
                    raise
                registry.failures.append(PluginFailure(name, info.distribution if info else name, str(exc)))
            except Exception as exc:
                fail(name, info.distribution if info else name, f"{hook.name} raised {type(exc).__name__}: {exc}")
    return pm, registry


def _register_one(registry: Registry, provider: str, info: PluginInfo | None, cls: type) -> None:
    entry = registry.register(cls, provider)
    if info is not None:
        info.components.append((entry.kind, entry.name))


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (built-ins plus installed plugins), built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = make_plugin_manager()[1]
    return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry; the next ``get_registry()`` reloads plugins."""
    global _REGISTRY
    _REGISTRY = None


@contextlib.contextmanager
def use_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide one inside the ``with`` block (tests, tools)."""
    global _REGISTRY
    saved, _REGISTRY = _REGISTRY, registry
    try:
        yield registry
    finally:
        _REGISTRY = saved
