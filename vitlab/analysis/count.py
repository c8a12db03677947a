"""One traced count of a module: FLOPs and activations per module and operator (fvcore), the
free and unsupported operators, and the ``FlopCounterMode`` second opinion.

Counting needs shapes, not values. vitlab's own models are therefore traced on the meta device
(no memory, no arithmetic): the jit trace records the same operators with the same shapes as on
CPU. The one exception is ``nn.Conv*``: torch's meta convolution cannot be jit-traced, so for the
duration of the trace a meta convolution calls a stand-in (:data:`META_CONV_OPS`), an operator with
the signature of ``aten::_convolution`` whose only kernel (Meta) gives the output's shape and no
storage. It is counted by whatever counts ``aten::_convolution`` and reported under that name, so
a count on meta tensors equals one on real weights, and a 4096 px image with 1 px patches costs no
more memory than a 224 px one. Anything else that cannot run on meta tensors raises, and the caller
retries with real (zero) weights; nothing silently changes a count.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..registry import Registry
from .handles import ACTS, FLOPS, FREE, combined_handles
from .report import KIND_KEYS


@dataclass
class Counts:
    """Inclusive per-module counters (fvcore's ``by_module_and_operator``, keys ``(what, op)``),
    unsupported operators of the whole model, and the ``FlopCounterMode`` total."""

    by_module_op: dict[str, Counter] = field(default_factory=dict)
    unsupported: Counter = field(default_factory=Counter)
    flop_counter: int | None = None

    def total(self, what: str, module: str = "") -> int:
        return int(sum(v for (w, _), v in self.by_module_op.get(module, Counter()).items() if w == what))

    def by_operator(self, what: str, module: str = "") -> dict[str, int]:
        c = self.by_module_op.get(module, Counter())
        return {op: int(v) for (w, op), v in sorted(c.items(), key=lambda kv: -kv[1]) if w == what}

    def module_totals(self, what: str = FLOPS) -> dict[str, int]:
        return {name: self.total(what, name) for name in self.by_module_op}


META_FAILURES: tuple[type[Exception], ...] = (NotImplementedError, RuntimeError, TypeError)
"""What a component that cannot run on meta tensors raises there: an operator without a meta
kernel (``NotImplementedError``), ``.item()`` or a data-dependent shape (``RuntimeError``), a
shape check traced with a tensor for its condition (``TypeError``: torch's meta convolution under
the jit tracer). The cue, and the only one, to count on real zero weights instead; anything else
(a wrong input size: ``ValueError``) is the caller's error and propagates."""


# --- tracing ----------------------------------------------------------------------------------------

# Stand-ins traced for meta ``nn.Conv*``, by the operator a real convolution traces as: the same
# arguments in the same order, so fvcore's ``conv_flop_jit`` and any plugin rule written for the
# aten operator read them unchanged. :func:`trace` counts each with the aten operator's handle and
# reports it under the aten name. ``_convolution_mode`` is what ``padding="same"/"valid"`` traces as.
_FLAGS = "bool benchmark, bool deterministic, bool cudnn_enabled, bool allow_tf32"
META_CONV_OPS: dict[str, tuple[str, str]] = {
    "aten::_convolution": (
        "vitlab_count::convolution",
        "Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
        f"bool transposed, SymInt[] output_padding, SymInt groups, {_FLAGS}",
    ),
    "aten::_convolution_mode": (
        "vitlab_count::convolution_mode",
        "Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, str padding, SymInt[] dilation, SymInt groups",
    ),
}
ATEN_OF_STAND_IN = {stand_in: aten for aten, (stand_in, _) in META_CONV_OPS.items()}


def _shape_only(x, weight, bias, stride, padding, dilation, *rest):
    """The stand-ins' one kernel (Meta): the output as a meta tensor, shape and dtype, no storage.
    Inside an operator's kernel the jit tracer is off, so torch's meta convolution works here."""
    if isinstance(padding, str):  # _convolution_mode: (..., padding, dilation, groups)
        return torch.ops.aten._convolution_mode(x, weight, bias, stride, padding, dilation, rest[0])
    transposed, output_padding, groups = rest[:3]
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


@functools.cache
def _stand_ins() -> dict[str, Any]:
    """Define the stand-in operators once per process (a second ``define`` would raise):
    aten name -> the callable ``torch.ops`` operator."""
    lib = torch.library.Library("vitlab_count", "FRAGMENT")
    ops = {}
    for aten, (stand_in, args) in META_CONV_OPS.items():
        name = stand_in.partition("::")[2]
        if not hasattr(torch.ops.vitlab_count, name):  # defined already by an earlier import (a reload)
            lib.define(f"{name}({args}) -> Tensor")
            lib.impl(name, _shape_only, "Meta")
        ops[aten] = getattr(torch.ops.vitlab_count, name)
    ops["_lib"] = lib  # the registrations live as long as the Library object
    return ops


class _MetaConvolutions(torch.overrides.TorchFunctionMode):
    """Every convolution of meta tensors traced as its stand-in, with the true shapes, allocating
    nothing. (Running it on CPU zeros instead, as vitlab used to, allocates the output: 12.9 GB for
    1 px patches of a 4096 px image.) Caught at ``F.conv*d``, so a conv subclass with its own
    forward (timm's ``StdConv2dSame``: SAME padding, standardised weights) keeps it; ``nn.Conv*``
    with a non-zero ``padding_mode`` has padded before it gets here."""

    CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
    ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        nd = self.CONVS.get(func)
        if nd is None or not args[0].is_meta:
            return func(*args, **kwargs)
        a = {**dict(zip(self.ARGS, args)), **kwargs}
        ops = _stand_ins()

        def per_dim(v):
            return [v] * nd if isinstance(v, int) else list(v)

        stride, dilation, groups = per_dim(a.get("stride", 1)), per_dim(a.get("dilation", 1)), a.get("groups", 1)
        padding = a.get("padding", 0)
        if isinstance(padding, str):
            return ops["aten::_convolution_mode"](a["input"], a["weight"], a.get("bias"), stride, padding, dilation,
                                                  groups)
        # the backend flags: what F.conv*d passes on CPU (fvcore ignores them)
        return ops["aten::_convolution"](a["input"], a["weight"], a.get("bias"), stride, per_dim(padding), dilation,
                                         False, [0] * nd, groups, False, False, True, True)


@contextlib.contextmanager
def meta_convolutions() -> Iterator[None]:
    """While tracing: convolutions on meta tensors as shape-only stand-ins."""
    with _MetaConvolutions():
        yield


def _registry_for(module: nn.Module, registry: Registry | None) -> Registry:
    """``registry``, else the one ``module`` was built with (``VisionTransformer.registry``), else
    the process-wide one: a model counted with another registry active keeps its own rules."""
    if registry is not None:
        return registry
    own = getattr(module, "registry", None)
    if isinstance(own, Registry):
        return own
    from ..plugins import get_registry

    return get_registry()


def component_scopes(module: nn.Module, registry: Registry) -> dict[str, str]:
    """Module name -> provider, for every submodule that is a registered component: what lets an
    operator inside a plugin's component be counted by that plugin's own rule."""
    providers = registry.component_providers()
    return {name: providers[type(m)] for name, m in module.named_modules() if type(m) in providers}


def trace(module: nn.Module, inputs: tuple[torch.Tensor, ...], registry: Registry | None = None) -> Counts:
    """fvcore's ``JitModelAnalysis`` with vitlab's combined handles: one trace gives FLOPs,
    activations and free-op tallies per module.

    ``registry``: whose operator rules count (default: the one the module was built with, else
    the process-wide one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import scripts functions: torch.jit deprecation
        from fvcore.nn.jit_analysis import JitModelAnalysis

    registry = _registry_for(module, registry)
    handles = combined_handles(registry, component_scopes(module, registry))
    for stand_in, aten in ATEN_OF_STAND_IN.items():
        if aten in handles:  # the combined handle files its counts under the aten name already
            handles[stand_in] = handles[aten]
    analysis = JitModelAnalysis(module, inputs).set_op_handle(**handles)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings(), meta_convolutions(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings
        stats = analysis.by_module_and_operator()
    return Counts(
        by_module_op={k: Counter(v) for k, v in stats.items()},
        # a stand-in nobody counts is unsupported under the name a real convolution has
        unsupported=Counter({ATEN_OF_STAND_IN.get(op, op): n for op, n in analysis.unsupported_ops("").items()}),
    )


def flop_counter_total(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """``torch.utils.flop_counter.FlopCounterMode`` on one eager forward (2 FLOPs per multiply-add).

    Shapes are all it needs, so it runs on meta stand-ins of the weights and inputs (no arithmetic),
    which do not require gradients: the counter's module tracker hooks the autograd graph of every
    module input that does, and a view of a parameter made under ``no_grad`` (attention pooling's
    ``latent.expand(B, ...)``) requires gradients without having a graph ("Expected gradient
    function to be set"). A module with real inputs that cannot run on meta tensors gets a real
    forward instead."""
    from torch.utils.flop_counter import FlopCounterMode

    state = {k: torch.empty_like(v, device="meta") for k, v in
             list(module.named_parameters()) + list(module.named_buffers())}
    meta_inputs = tuple(torch.empty_like(t, device="meta") for t in inputs)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            torch.func.functional_call(module, state, meta_inputs)
        return int(counter.get_total_flops())
    except META_FAILURES:
        if all(t.is_meta for t in inputs):
            raise
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def count(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], second_opinion: bool = True, registry: Registry | None = None
) -> Counts:
    """Trace ``module`` on ``inputs`` (wherever they live) and, optionally, run ``FlopCounterMode``.

    ``registry``: whose operator rules count; pass the model's (``model.registry``) when
    ``module`` is a wrapper around parts of it. Default: ``module.registry``, else the process one."""
    counts = trace(module, inputs, registry)
    if second_opinion:
        counts.flop_counter = flop_counter_total(module, inputs)
    return counts


# --- meta and real weights -----------------------------------------------------------------------------

def materialize(module: nn.Module, device: str = "cpu") -> nn.Module:
    """Give a meta module real, zero-filled storage in place (values do not matter for counting;
    zeros avoid the slow arithmetic of uninitialised denormals)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.zero_()
    return module


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# --- attributing to kinds ------------------------------------------------------------------------------

_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                getattr(nn, "RMSNorm", nn.LayerNorm))


def _own_kind(name: str, module: nn.Module) -> str | None:
    from ..component import Component

    if isinstance(module, Component):
        kind = type(module).kind
        if kind == "norm":
            return "norm"
        return kind if kind in KIND_KEYS else "other"  # a block's own ops (layer scale): other
    if isinstance(module, _TORCH_NORMS):
        return "norm"
    if name == "head":
        return "head"
    return None


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Module name -> kind: its own component kind (norms are ``norm`` wherever they sit), else
    the nearest ancestor's; ``head`` for the classifier; ``other`` outside any component."""
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        parent = kinds.get(name.rpartition(".")[0], "other") if name else "other"
        kinds[name] = _own_kind(name, module) or parent
    return kinds


def exclusive(totals: dict[str, int]) -> dict[str, int]:
    """Inclusive per-module totals -> what each module does outside its child modules."""
    out = dict(totals)
    for name, value in totals.items():
        if name:
            parent = name.rpartition(".")[0]
            if parent in out:
                out[parent] -= value
    return out


def by_kind(model: nn.Module, counts: Counts) -> dict[str, int]:
    kinds = module_kinds(model)
    out = dict.fromkeys(KIND_KEYS, 0)
    for name, value in exclusive(counts.module_totals(FLOPS)).items():
        out[kinds.get(name, "other")] += value
    return out


def by_module(model: nn.Module, counts: Counts) -> dict[str, int]:
    """FLOPs of each top-level part and of each block (dropouts and identities left out)."""
    totals = counts.module_totals(FLOPS)
    skip = (nn.Dropout, nn.Identity)
    out: dict[str, int] = {}
    for name, child in model.named_children():
        if isinstance(child, skip):
            continue
        out[name] = totals.get(name, 0)
        if isinstance(child, nn.ModuleList):
            for i, _ in enumerate(child):
                out[f"{name}.{i}"] = totals.get(f"{name}.{i}", 0)
    return out


def free_ops(counts: Counts) -> dict[str, int]:
    return counts.by_operator(FREE)


def free_reasons(ops: dict[str, int], registry) -> dict[str, str]:
    """Why each free operator counts 0: the ``free=`` reason of the declaration that counted it
    (the first, built-ins first), vitlab's own table when there is no registry at hand."""
    from ..components.flops import FREE_OPS

    rules = registry.op_rules if registry is not None else {}
    return {op: (rules[op].free if op in rules and rules[op].free else FREE_OPS.get(op, "declared free")) for op in ops}


def activations(counts: Counts) -> int:
    return counts.total(ACTS)
