"""The registry of named components: kind -> name -> (class, provider).

It is filled by calling every plugin's ``vitlab_register_components`` hook (see ``plugins.py``)
and is what validation, model building, the JSON schema and the CLI read.

A component's contract is checked when it is registered, not when a recipe first uses it: its
``Params`` must be a complete pydantic model whose defaults validate and round-trip through JSON
(a spec stores params as JSON data) and that has a JSON schema; plain ``bool`` fields are made
strict like the built-ins' ``StrictBool`` (``"no"`` and ``1`` are refused, not read as booleans).

The registry also remembers what went wrong while plugins loaded (``failures``, names registered
by two plugins, operators declared twice) so that an unknown name in a recipe can say which
failed plugin may have provided it, and ``warnings()`` gives one line per problem.
"""
from __future__ import annotations

import re
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Literal, Union, get_args, get_origin

from pydantic import BaseModel, StrictBool, ValidationError, create_model
from pydantic.types import Strict

from .errors import PluginError, known, one_line, unknown_choice
from .kinds import KINDS

if TYPE_CHECKING:  # the classes themselves need torch: imported where a component is checked
    from .component import Component

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

BUILTIN = "vitlab"
"""The provider name of vitlab's own components."""

DISABLE_ENV = "VITLAB_DISABLE_PLUGINS"
"""``=1`` skips every external plugin, ``=name,...`` those entry-point or distribution names."""


def describe_exception(exc: BaseException) -> str:
    """``TypeName: message`` on one line, whatever the exception (foreign code raised it)."""
    if isinstance(exc, SystemExit):  # sys.exit() carries only a code
        return f"SystemExit (exit code {exc.code!r})"
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001  (a broken __str__ must not hide the original problem)
        text = ""
    # pydantic appends "For further information visit <url>" paragraphs: not useful on one line
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("For further information")]
    text = " ".join(lines)
    return one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


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

    @property
    def origin(self) -> str:
        """``'provider' (module.Class)``: who registered it, for messages about clashes."""
        return f"'{self.provider}' ({self.cls.__module__}.{self.cls.__qualname__})"


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
    """A plugin that could not be loaded, whose hook raised, or that broke a contract.

    ``components`` are the ``(kind, name)`` it tried to register before failing; ``complete`` says
    its hooks ran to the end, so that list is everything it provides (``False``: it may provide
    more, e.g. its import failed). ``skip`` is the ``VITLAB_DISABLE_PLUGINS`` value that skips it
    (``None`` for a plugin passed in-process, which the variable does not affect).
    """

    name: str
    distribution: str
    reason: str
    components: tuple[tuple[str, str], ...] = ()
    complete: bool = False
    skip: str | None = None

    @property
    def label(self) -> str:
        """``plugin 'rope' (distribution 'vitlab-rope')``."""
        if self.distribution and self.distribution != self.name:
            return f"plugin '{self.name}' (distribution '{self.distribution}')"
        return f"plugin '{self.name}'"

    def message(self) -> str:
        """The one line a user reads: who failed, why, and how to get going without it."""
        hint = f"; set {DISABLE_ENV}={self.skip} to skip it" if self.skip else ""
        return one_line(f"{self.label} failed: {self.reason}{hint}")


@dataclass
class PluginInfo:
    """An external plugin distribution and what it registered."""

    name: str
    distribution: str
    version: str
    value: str
    components: list[tuple[str, str]] = field(default_factory=list)


# --- component contracts --------------------------------------------------------------------------

def _strict_bools(tp: Any) -> Any:
    """``tp`` with every plain ``bool`` in it made ``StrictBool``, also inside ``Optional[bool]``,
    ``tuple[bool, ...]`` and the like; ``tp`` itself when nothing changes."""
    if tp is bool:
        return StrictBool
    origin, args = get_origin(tp), get_args(tp)
    if not args or origin is Literal:
        return tp
    if origin is Annotated:
        if any(isinstance(m, Strict) for m in tp.__metadata__):  # StrictBool, or an explicit choice
            return tp
        inner = _strict_bools(args[0])
        return tp if inner is args[0] else Annotated[(inner, *tp.__metadata__)]
    new = tuple(_strict_bools(a) for a in args)
    if all(n is a for n, a in zip(new, args)):
        return tp
    if origin is Union or origin is types.UnionType:
        return Union[new]
    try:
        return origin[new]
    except TypeError:  # a generic that cannot be re-subscripted: leave it as written
        return tp


def _with_strict_bools(params: type[BaseModel]) -> type[BaseModel]:
    """``params``, or a subclass of it whose plain ``bool`` fields are ``StrictBool``.

    pydantic reads ``"no"``, ``"off"``, ``0`` and ``1`` as booleans in lax mode; the built-ins use
    ``StrictBool`` so that a recipe's ``qk_norm: "no"`` is an error rather than ``False``, and a
    plugin's ``bool`` should behave the same. The subclass keeps defaults, descriptions,
    constraints, validators and the model config; a field marked ``Field(strict=False)`` is left
    alone.
    """
    changed: dict[str, Any] = {}
    for name, info in params.model_fields.items():
        if any(isinstance(m, Strict) for m in info.metadata):
            continue
        strict = _strict_bools(info.annotation)
        if strict is not info.annotation:
            changed[name] = (strict, info)
    if not changed:
        return params
    model = create_model(params.__name__, __base__=params, __module__=params.__module__, __doc__=params.__doc__, **changed)
    model.__qualname__ = params.__qualname__
    return model


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    e = errors[0]
    loc = ".".join(str(p) for p in e["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc + ': ' if loc else ''}{e['msg']}{more}"


def _checked_params(cls: type) -> type[BaseModel]:
    """The component's ``Params`` once it passes the contract (possibly with strict bools);
    ``PluginError`` saying what is wrong otherwise (messages read after ``plugin 'X' ``)."""
    q = cls.__qualname__
    params = cls.Params
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise PluginError(f"registered {q}, whose Params is not a pydantic model")
    if not params.__pydantic_complete__:  # e.g. an annotation that names an undefined type
        try:
            # depth 0: resolve names in the plugin's module only, never in this function's locals
            params.model_rebuild(raise_errors=True, _parent_namespace_depth=0)
        except Exception as exc:  # noqa: BLE001  (pydantic raises several kinds here)
            raise PluginError(f"registered {q}, whose Params is not fully defined: {describe_exception(exc)}") from None
    try:
        params = _with_strict_bools(params)
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"registered {q}, whose Params cannot be rebuilt with strict booleans: {describe_exception(exc)}") from None
    try:
        defaults = params()
    except ValidationError as exc:
        missing = [".".join(str(p) for p in e["loc"]) for e in exc.errors() if e["type"] == "missing"]
        if missing:
            raise PluginError(
                f"registered {q}, whose Params has no default for {', '.join(missing)} "
                "(every field needs one: a bare name in a recipe means default params)"
            ) from None
        raise PluginError(f"registered {q}, whose Params() does not validate: {_first_error(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"registered {q}, whose Params() raised {describe_exception(exc)}") from None
    try:
        params.model_json_schema()
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"registered {q}, whose Params has no JSON schema: {describe_exception(exc)}") from None
    # A spec stores params as JSON data and validates them again when it is used: the defaults
    # must survive that (pydantic does not validate defaults, so this is also where a default
    # that breaks the field's own constraints is caught).
    try:
        params.model_validate(defaults.model_dump(mode="json"))
    except ValidationError as exc:
        raise PluginError(f"registered {q}, whose Params defaults do not validate: {_first_error(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"registered {q}, whose Params defaults do not round-trip through JSON: {describe_exception(exc)}") from None
    return params


def check_component(cls: Any, provider: str) -> ComponentInfo:
    """Check a class handed to ``register``; ``PluginError`` (provider-less text) if it is not a
    valid component. May replace ``cls.Params`` by a strict-boolean subclass."""
    from .component import KIND_BASES, Component  # torch: only once components are registered

    if not (isinstance(cls, type) and issubclass(cls, Component)):
        raise PluginError(
            f"registered {cls!r}, which is not a component class "
            f"(subclass one of vitlab.{', vitlab.'.join(b.__name__ for b in KIND_BASES.values())})"
        )
    kind, name = cls.kind, cls.name
    if kind not in KINDS:
        raise PluginError(f"registered {cls.__qualname__} with unknown kind {kind!r}; {known(KINDS)}")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(
            f"registered {cls.__qualname__} with invalid name {name!r} "
            "(lower-case letters, digits and '_', starting with a letter)"
        )
    cls.Params = _checked_params(cls)
    return ComponentInfo(kind, name, cls, provider)


def check_op(op: Any, provider: str, *, flops=None, activations=None, free: str | None = None) -> OpRule:
    """Check one ``vitlab_flop_handles`` declaration; ``PluginError`` (provider-less text) if malformed."""
    if not isinstance(op, str) or "::" not in op:
        raise PluginError(f"declared FLOPs for {op!r}; expected a traced name like 'aten::elu'")
    if flops is None and activations is None and not free:
        raise PluginError(f"declared {op} with neither a handle nor a reason it is free")
    if free is not None and not isinstance(free, str):
        raise PluginError(f"declared {op} free with a reason that is not a string: {free!r}")
    for handle in (flops, activations):
        if handle is not None and not callable(handle):
            raise PluginError(f"declared {op} with a handle that is not callable: {handle!r}")
    return OpRule(op, provider, flops, activations, free or None)


def _counts_nothing(rule: OpRule) -> bool:
    return rule.flops is None and rule.activations is None


# --- the registry -----------------------------------------------------------------------------------

class Registry:
    """Components by kind and name, and the operator rules of FLOP counting.

    ``commit`` adds what one plugin registered, all or nothing. A name registered by two external
    plugins becomes *ambiguous* when allowed (the lenient process registry): neither provides it
    and a recipe that selects it fails naming both; a plugin that reuses a built-in name fails.
    """

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, ComponentInfo]] = {k: {} for k in KINDS}
        self._ambiguous: dict[tuple[str, str], list[ComponentInfo]] = {}
        self.plugins: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []
        self.disabled: list[PluginInfo] = []  # entry points skipped by VITLAB_DISABLE_PLUGINS
        # op -> the rule that counts it outside the components of the plugins that declared it:
        # the first declaration (built-ins load first); see ``analysis.handles`` for fvcore's place
        self.op_rules: dict[str, OpRule] = {}
        self.op_declarations: dict[str, list[OpRule]] = {}  # op -> every declaration, in load order
        # (kind, name) -> the plugin-declared timm twin of that component (``vitlab_timm_equivalents``)
        self.timm_equivalents: dict[tuple[str, str], Any] = {}
        self.reported = False  # whether ``plugins.report_failures`` printed its warnings (once per registry)

    # --- filling ----------------------------------------------------------------------------------

    def commit(self, components: list[ComponentInfo], ops: list[OpRule], *, allow_ambiguous: bool = False,
               equivalents: list = ()) -> None:
        """Add one plugin's checked components and operator rules, or nothing (``PluginError``).

        Refused: a name the plugin registers twice, a built-in name, and (unless
        ``allow_ambiguous``) a name another plugin registered. An operator declared by several
        plugins is not an error: each declaration counts the operator inside its own plugin's
        components (``rule_for``), the first one everywhere else.
        """
        seen: dict[tuple[str, str], ComponentInfo] = {}
        for info in components:
            key = (info.kind, info.name)
            if key in seen:
                raise PluginError(
                    f"registered {info.kind} '{info.name}' twice "
                    f"({seen[key].cls.__qualname__} and {info.cls.__qualname__})"
                )
            seen[key] = info
            clash = self._by_kind[info.kind].get(info.name) or next(iter(self._ambiguous.get(key, ())), None)
            if clash is None:
                continue
            # vitlab's defaults select built-in names: a plugin taking one over would make every
            # recipe ambiguous, so it is the plugin's failure rather than an ambiguous name
            builtin = BUILTIN in (clash.provider, info.provider)
            if builtin or not allow_ambiguous:
                raise PluginError(
                    f"{info.kind} '{info.name}' is registered twice: by {clash.origin} and by {info.origin}"
                    + (" (a plugin cannot replace a built-in)" if builtin else "")
                )
        declared: set[str] = set()
        for rule in ops:
            if rule.op in declared:
                raise PluginError(f"declared FLOPs of {rule.op} twice")
            declared.add(rule.op)
        claimed = {eq.timm_type: eq for eq in self.timm_equivalents.values()}
        for eq in equivalents:
            if (eq.kind, eq.name) not in seen:
                raise PluginError(f"declared a timm equivalent for {eq.kind} '{eq.name}', which it does not register")
            own = seen[(eq.kind, eq.name)].cls.__module__.split(".")[0]
            if eq.timm_type.__module__.split(".")[0] != own:  # only the plugin's own classes may be claimed
                raise PluginError(f"timm equivalent of {eq.kind} '{eq.name}': timm_type must be the plugin's own "
                                  f"class (from '{own}', where the component is), not "
                                  f"{eq.timm_type.__module__}.{eq.timm_type.__qualname__}")
            if (other := claimed.get(eq.timm_type)) is not None:
                raise PluginError(f"{eq.timm_type.__qualname__} is already the timm equivalent of {other.kind} "
                                  f"'{other.name}' (plugin '{other.provider}')")
            claimed[eq.timm_type] = eq
        for info in components:
            key = (info.kind, info.name)
            if key in self._ambiguous:
                self._ambiguous[key].append(info)
            elif info.name in self._by_kind[info.kind]:
                # two plugins, neither at fault: the name is withdrawn, both stay loaded
                self._ambiguous[key] = [self._by_kind[info.kind].pop(info.name), info]
            else:
                self._by_kind[info.kind][info.name] = info
        for rule in ops:
            self.op_declarations.setdefault(rule.op, []).append(rule)
            self.op_rules.setdefault(rule.op, rule)
        for eq in equivalents:
            self.timm_equivalents[(eq.kind, eq.name)] = eq

    # --- reading ------------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind))

    def get(self, kind: str, name: str) -> ComponentInfo:
        """The component, or ``KeyError`` with a message listing the known names."""
        table = self._kind(kind)
        if name not in table:
            raise KeyError(self.unknown_message(kind, name))
        return table[name]

    def unknown_message(self, kind: str, name: Any) -> str:
        """Why ``name`` is not a usable ``kind``: ambiguous (naming both providers), possibly
        provided by a plugin that failed to load (naming it and why), or simply unknown."""
        table = self._kind(kind)
        rivals = self._ambiguous.get((kind, name)) if isinstance(name, str) else None
        if rivals:
            return one_line(
                f"{kind} '{name}' is ambiguous: registered by "
                + " and by ".join(i.origin for i in rivals)
                + f"; set {DISABLE_ENV}=" + f" or {DISABLE_ENV}=".join(i.provider for i in rivals)
                + " to use the other"
            )
        wanted = (kind, name)
        failed = [f for f in self.failures if wanted in f.components]
        if failed:
            extra = "".join(f"; {f.label} that provides it failed to load: {f.reason}" for f in failed)
            return one_line(unknown_choice(kind, name, table, extra=extra))
        # not registered by anything that loaded: a plugin the user disabled is the likeliest reason
        # (its code never ran, so what it provides is unknown), then one that failed before saying
        extra = ""
        if self.disabled:
            names = ", ".join(f"'{i.name}'" for i in self.disabled)
            extra += f"; {DISABLE_ENV} disables plugin{'s' if len(self.disabled) > 1 else ''} {names}, which may provide it"
        extra += "".join(f"; {f.label} that may provide it failed to load: {f.reason}"
                         for f in self.failures if not f.complete)
        return one_line(unknown_choice(kind, name, table, extra=extra or ", provided by no installed plugin"))

    def ambiguous(self) -> dict[tuple[str, str], list[ComponentInfo]]:
        """``(kind, name)`` registered by more than one plugin -> their registrations."""
        return {k: list(v) for k, v in self._ambiguous.items()}

    def rule_for(self, op: str, provider: str) -> OpRule | None:
        """``provider``'s own declaration of ``op``, if it made one."""
        return next((r for r in self.op_declarations.get(op, ()) if r.provider == provider), None)

    def component_providers(self) -> dict[type, str]:
        """Component class -> the provider that registered it (ambiguous ones included)."""
        out = {i.cls: i.provider for table in self._by_kind.values() for i in table.values()}
        out.update({i.cls: i.provider for infos in self._ambiguous.values() for i in infos})
        return out

    def warnings(self) -> list[str]:
        """One line per problem found while loading plugins (without a ``warning:`` prefix)."""
        lines = [f.message() for f in self.failures]
        for (kind, name), infos in self._ambiguous.items():
            lines.append(one_line(
                f"{kind} '{name}' is registered by " + " and by ".join(i.origin for i in infos)
                + f"; a recipe that selects it fails until you set {DISABLE_ENV} to one of "
                + ", ".join(i.provider for i in infos)
            ))
        for op, rules in self.op_conflicts().items():
            lines.append(one_line(
                f"FLOPs of {op} are declared by " + " and by ".join(f"'{r.provider}'" for r in rules)
                + f": each counts it inside its own components, '{rules[0].provider}' everywhere else"
            ))
        return lines

    def op_conflicts(self) -> dict[str, list[OpRule]]:
        """Operators declared by several providers that may count them differently (all of them
        declaring it free is no disagreement); the first declaration is the one used outside
        the declaring plugins' own components."""
        return {op: list(rules) for op, rules in self.op_declarations.items()
                if len(rules) > 1 and not all(_counts_nothing(r) for r in rules)}

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
