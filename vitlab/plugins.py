"""The plugin manager: hookspecs, built-ins, entry points, then ``check_pending()``.

Built-in components are registered exactly like outside plugins: ``vitlab.components`` is a
plugin module implementing ``vitlab_register_components``.

``VITLAB_DISABLE_PLUGINS=1`` skips every external plugin; a comma list
(``VITLAB_DISABLE_PLUGINS=rope,vitlab-convstem``) skips those entry-point or distribution names.

One broken plugin never stops the rest. The process-wide registry (``load_registry()``) loads
leniently: a plugin whose import fails (``sys.exit()`` and ``KeyboardInterrupt`` raised by the
plugin included), that implements an unknown hook, whose hook raises, or that registers something
breaking the component contract (see ``registry.py``) is recorded in ``registry.failures``, with
nothing it registered left behind, and the others load. ``report_failures`` prints one
``warning:`` line per problem. ``make_plugin_manager(strict=True)`` raises ``PluginError`` instead.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import signal
import threading
import warnings
from typing import Any, Callable, Iterable, Iterator

import pluggy

from . import hookspecs
from .hookspecs import VITLAB_API
from .twins import check_equivalent
from .errors import PluginError, unknown_choice
from .registry import (
    BUILTIN,
    DISABLE_ENV,
    ComponentInfo,
    OpRule,
    PluginFailure,
    PluginInfo,
    Registry,
    check_component,
    check_op,
    describe_exception,
)

ENTRY_POINT_GROUP = "vitlab"
HOOKS = tuple(sorted(n for n in vars(hookspecs) if n.startswith("vitlab_")))

__all__ = [
    "BUILTIN", "DISABLE_ENV", "ENTRY_POINT_GROUP", "disabled_plugins", "get_registry", "load_registry",
    "make_plugin_manager",
    "report_failures", "reset_registry", "use_registry",
]


# --- entry points -------------------------------------------------------------------------------------

def disabled_plugins() -> set[str] | bool:
    """``True`` when all external plugins are disabled, else the set of disabled names."""
    value = os.environ.get(DISABLE_ENV, "").strip()
    if value.lower() in {"1", "true", "yes", "all", "*"}:
        return True
    return {v.strip() for v in value.split(",") if v.strip()}


def _metadata_name(ep: importlib.metadata.EntryPoint) -> str | None:
    """The distribution's ``Name``, ``None`` when its METADATA has none (a broken installation)."""
    try:
        name = ep.dist.name if ep.dist is not None else None
    except Exception:  # noqa: BLE001  (unreadable metadata)
        return None
    return name.strip() if isinstance(name, str) and name.strip() else None


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    """The distribution's name, or, without one, the name of its ``.dist-info`` folder (the only
    clue left to find it by) or ``"?"``."""
    name = _metadata_name(ep)
    if name is not None:
        return name
    path = getattr(ep.dist, "_path", None)  # PathDistribution keeps its folder privately
    return getattr(path, "name", None) or "?"


def _dist_version(ep: importlib.metadata.EntryPoint) -> str:
    try:
        version = ep.dist.version if ep.dist is not None else None
    except Exception:  # noqa: BLE001
        version = None
    return version if isinstance(version, str) and version else "?"


def _is_disabled(ep: importlib.metadata.EntryPoint, disabled: set[str] | bool) -> bool:
    if disabled is True:
        return True
    dist = _metadata_name(ep) or ""
    return bool(({ep.name, dist, dist.replace("-", "_")} - {""}) & disabled)  # type: ignore[operator]


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def api_problem(plugin: object, *, required: bool) -> str | None:
    """Why ``plugin`` cannot load under this vitlab's plugin API (its ``vitlab_api``), or ``None``.

    Installed plugins (``required``) must declare it; an object handed to ``make_plugin_manager``
    in-process is written against the running vitlab and is checked only when it declares one.
    """
    try:
        declared = getattr(plugin, "vitlab_api", None)
    except Exception:  # noqa: BLE001  (a plugin object whose attribute access raises)
        declared = None
    if declared is None:
        if not required:
            return None
        return (f"declares no vitlab_api: it was written for vitlab 0.1; port it and set vitlab_api = {VITLAB_API} "
                "(see docs/migration.md)")
    if declared == VITLAB_API and type(declared) is int:
        return None
    if isinstance(declared, int) and declared > VITLAB_API:
        return f"targets vitlab_api = {declared}, newer than this vitlab's {VITLAB_API}: upgrade vitlab"
    return (f"targets vitlab_api = {declared!r}, this vitlab speaks {VITLAB_API}: port it "
            "(see docs/migration.md)")


# --- containing foreign code ----------------------------------------------------------------------

@contextlib.contextmanager
def _sigint_watch() -> Iterator[Callable[[], bool]]:
    """Yield ``pressed()``: whether the user pressed Ctrl-C inside the ``with`` block.

    A plugin that raises ``KeyboardInterrupt`` (or ``SystemExit``) at import is contained like any
    failure, but a real Ctrl-C must still stop vitlab. Both arrive as ``KeyboardInterrupt``; only
    the user's goes through the SIGINT handler, so it is wrapped while plugins load. Outside the
    main thread handlers cannot be installed: every ``KeyboardInterrupt`` counts as the user's.
    """
    pressed: list[bool] = []
    previous = signal.getsignal(signal.SIGINT)
    watch = threading.current_thread() is threading.main_thread() and callable(previous)

    def handler(signum, frame):
        pressed.append(True)
        previous(signum, frame)  # normally raises KeyboardInterrupt

    if watch:
        signal.signal(signal.SIGINT, handler)
    try:
        # SIGINT ignored (a job started in the background by a shell): no Ctrl-C can arrive at all
        ignored = previous is signal.SIG_IGN
        yield lambda: bool(pressed) or not (watch or ignored)
    finally:
        if watch:
            signal.signal(signal.SIGINT, previous)


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Names of ``vitlab_*`` functions of ``plugin`` that match no hookspec (a misspelling)."""
    return sorted(
        caller.name for caller in pm.get_hookcallers(plugin) or ()
        if not caller.has_spec()
        and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls())
    )


class _Stage:
    """What one plugin registers through its hooks, checked and held back until they have all
    returned, so that a plugin that fails leaves nothing behind in the registry.

    A problem is recorded rather than raised into the plugin's hook: a hook that catches
    exceptions around ``register`` cannot hide it.
    """

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.components: list[ComponentInfo] = []
        self.ops: list[OpRule] = []
        self.equivalents: list = []  # TimmEquivalent, checked
        self.names: list[tuple[str, str]] = []  # every (kind, name) it tried, valid or not
        self.problems: list[str] = []
        self.open = True

    def component(self, cls: Any) -> None:
        self._check_open()
        try:  # what it meant to register, for "plugin X that provides it failed" messages
            kind, name = cls.kind, cls.name
        except Exception:  # noqa: BLE001  (not a component at all)
            kind = name = None
        if isinstance(kind, str) and isinstance(name, str):
            self.names.append((kind, name))
        try:
            self.components.append(check_component(cls, self.provider))
        except PluginError as exc:
            self.problems.append(str(exc))

    def op(self, op: Any, *, flops=None, activations=None, free: str | None = None) -> None:
        self._check_open()
        try:
            self.ops.append(check_op(op, self.provider, flops=flops, activations=activations, free=free))
        except PluginError as exc:
            self.problems.append(str(exc))

    def equivalent(self, eq: Any) -> None:
        self._check_open()
        try:
            self.equivalents.append(check_equivalent(eq, self.provider))
        except PluginError as exc:
            self.problems.append(str(exc))

    def _check_open(self) -> None:
        if not self.open:  # a plugin that kept ``register`` and calls it later (e.g. while building)
            raise PluginError(f"plugin '{self.provider}' called register() after its hook returned")


class _Loader:
    """Loads plugins into ``pm`` and ``registry``; ``fail`` raises when strict, else records."""

    def __init__(self, pm: pluggy.PluginManager, registry: Registry, strict: bool, user_interrupt: Callable[[], bool]):
        self.pm, self.registry, self.strict = pm, registry, strict
        self.user_interrupt = user_interrupt
        self.builtin = PluginInfo(BUILTIN, BUILTIN, "", "vitlab.components")
        self.loaded: list[tuple[PluginInfo, str | None]] = []  # (info, VITLAB_DISABLE_PLUGINS value)

    def attempt(self, fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, BaseException | None]:
        """``(fn(...), None)``, or ``(None, exception)`` for anything foreign code raises but the
        user's Ctrl-C."""
        try:
            return fn(*args, **kwargs), None
        except BaseException as exc:  # SystemExit and a plugin's own KeyboardInterrupt included
            if isinstance(exc, KeyboardInterrupt) and self.user_interrupt():
                raise
            return None, exc

    def fail(self, info: PluginInfo, skip: str | None, reason: str, *,
             names: Iterable[tuple[str, str]] = (), complete: bool = False) -> None:
        failure = PluginFailure(info.name, info.distribution, reason, tuple(names), complete, skip)
        if self.strict or info is self.builtin:  # a failing built-in is a bug in vitlab: never hidden
            raise PluginError(failure.message())
        self.registry.failures.append(failure)

    def drop(self, plugin: object) -> None:
        """Take a failed plugin out of pluggy too, so ``pm`` holds what the registry holds."""
        if self.pm.is_registered(plugin):
            self.pm.unregister(plugin)

    def entry_points(self) -> None:
        disabled = disabled_plugins()
        found, exc = self.attempt(lambda: sorted(_entry_points(), key=lambda ep: (_dist_name(ep), ep.name)))
        if exc is not None:  # e.g. unreadable metadata somewhere on sys.path
            if disabled is not True:
                self.fail(PluginInfo("*", "", "", ""), "1", f"listing the '{ENTRY_POINT_GROUP}' entry points raised {describe_exception(exc)}")
            return
        for ep in found:
            info = PluginInfo(ep.name, _dist_name(ep), _dist_version(ep), ep.value)
            if _is_disabled(ep, disabled):
                self.registry.disabled.append(info)
                continue
            if _metadata_name(ep) is None:
                self.fail(info, ep.name, "its distribution has no Name in its METADATA (a broken installation: reinstall or remove it)")
                continue
            plugin, exc = self.attempt(ep.load)
            if exc is not None:
                self.fail(info, ep.name, f"import of '{ep.value}' raised {describe_exception(exc)}")
                continue
            self.add(info, plugin, skip=ep.name)

    def add(self, info: PluginInfo, plugin: object, skip: str | None) -> None:
        """Register ``plugin`` with pluggy under ``info.name``; its hooks run later (``run_hooks``)."""
        problem = api_problem(plugin, required=skip is not None)  # entry points must declare one
        if problem is not None:
            self.fail(info, skip, problem)
            return
        if self.pm.is_registered(plugin):
            self.fail(info, skip, f"'{info.value}' is already loaded as plugin '{self.pm.get_name(plugin)}'")
            return
        if self.pm.get_plugin(info.name) is not None or self.pm.is_blocked(info.name):
            self.fail(info, skip, f"another plugin is already registered under the name '{info.name}'")
            return
        _, exc = self.attempt(self.pm.register, plugin, name=info.name)
        if exc is not None:  # pluggy rejects malformed hook implementations, possibly half-way
            self.drop(plugin)
            self.fail(info, skip, describe_exception(exc))
            return
        unknown = _unknown_hooks(self.pm, plugin)
        if unknown:  # a misspelled vitlab_* hook: it would silently never be called
            self.drop(plugin)
            self.fail(info, skip, "; ".join(unknown_choice("hook", name, HOOKS) for name in unknown))
            return
        self.loaded.append((info, skip))

    def run_hooks(self, info: PluginInfo, skip: str | None) -> None:
        """Call the plugin's hooks and commit what it registered, or record why it failed."""
        plugin = self.pm.get_plugin(info.name)
        stage = _Stage(info.distribution)
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        hooks = (("vitlab_register_components", stage.component), ("vitlab_flop_handles", stage.op),
                 ("vitlab_timm_equivalents", stage.equivalent))
        try:
            for name, register in hooks:
                # pluggy's own call path, narrowed to this plugin: what it registers is staged
                # apart from the others', and its exception fails it alone
                hook = self.pm.subset_hook_caller(name, remove_plugins=others)
                if any(i.hookwrapper or i.wrapper for i in hook.get_hookimpls()):
                    stage.problems.append(f"{name} is a hook wrapper; vitlab calls it once, as a plain hook")
                    continue
                _, exc = self.attempt(hook, register=register)
                if exc is not None:
                    self.drop(plugin)
                    self.fail(info, skip, f"{name} raised {describe_exception(exc)}", names=stage.names)
                    return
        finally:
            stage.open = False
        try:
            if stage.problems:
                raise PluginError("; ".join(stage.problems))
            self.registry.commit(stage.components, stage.ops, allow_ambiguous=not self.strict,
                                 equivalents=stage.equivalents)
        except PluginError as exc:
            self.drop(plugin)
            self.fail(info, skip, str(exc), names=stage.names, complete=True)
            return
        info.components = [(c.kind, c.name) for c in stage.components]
        if info is not self.builtin:
            self.registry.plugins.append(info)


def make_plugin_manager(
    *, entry_points: bool = True, plugins: Iterable[tuple[str, object]] = (), strict: bool = True
) -> tuple[pluggy.PluginManager, Registry]:
    """Build the plugin manager and the registry it fills.

    Args:
        entry_points: load external plugins from the ``vitlab`` entry-point group.
        plugins: extra ``(name, plugin)`` pairs registered after the entry points (tests use this).
        strict: raise ``PluginError`` for a plugin that fails to load; otherwise record it in
            ``registry.failures``, register nothing of it, and go on (``vitlab plugins`` and
            ``registry.warnings()`` show them). Strict also refuses a component name registered
            by two plugins, which lenient loading makes ambiguous instead.
    """
    components = importlib.import_module("vitlab.components")  # built-ins, registered like any plugin

    pm = pluggy.PluginManager("vitlab")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    pm.register(components, name=BUILTIN)

    with _sigint_watch() as user_interrupt:
        loader = _Loader(pm, registry, strict, user_interrupt)
        if entry_points:
            loader.entry_points()
        for name, plugin in plugins:
            loader.add(PluginInfo(name, name, "", repr(plugin)), plugin, skip=None)
        try:
            pm.check_pending()  # per-plugin checks above make this pass; it guards the built-ins
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin '{exc.plugin}' implements an unknown hook: {exc}") from None
        # built-ins first: a clash names the built-in first, and they are the first rule of an op
        for info, skip in [(loader.builtin, None), *loader.loaded]:
            loader.run_hooks(info, skip)
    return pm, registry


# --- the process-wide registry ---------------------------------------------------------------------

_REGISTRY: Registry | None = None
_ECHO: Callable[[str], Any] | None = None


def load_registry() -> Registry:
    """The registry of vitlab's built-ins and every installed plugin: the one the public API
    (``load_spec``, ``build_model``, ``analyze``, ``spec_from_timm``, the CLI) uses when it is given
    none. Built leniently on first use and kept for the process: a broken plugin is in ``failures``
    and the rest work. ``make_plugin_manager`` builds a fresh one (strict, or from chosen plugins)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = make_plugin_manager(strict=False)[1]
        _report(_REGISTRY)
    return _REGISTRY


get_registry = load_registry  # the former name, while callers move to load_registry


def report_failures(echo: Callable[[str], Any]) -> None:
    """Send ``warning: ...`` lines about the process-wide registry to ``echo``, once per registry:
    now if it is built, else as soon as ``load_registry()`` builds it (so a command that never
    reads components never loads plugins). The CLI calls this once before running a command."""
    global _ECHO
    _ECHO = echo
    if _REGISTRY is not None:
        _report(_REGISTRY)


class PluginWarning(UserWarning):
    """A plugin failed to load (or two register one name): the Python API's form of the CLI's
    ``warning:`` lines, so a script using vitlab is not silent about it."""


def _report(registry: Registry) -> None:
    if registry.reported:
        return
    registry.reported = True
    for line in registry.warnings():
        if _ECHO is not None:
            _ECHO(f"warning: {line}")
        else:  # no CLI asked for the lines: the Python caller gets them as warnings
            warnings.warn(line, PluginWarning, stacklevel=3)


def reset_registry() -> None:
    """Forget the process-wide registry; the next ``load_registry()`` reloads plugins."""
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
