"""One traced count of a module: FLOPs and activations per module and operator (fvcore), the
free and unsupported operators, and the ``FlopCounterMode`` second opinion.

Counting needs shapes, not values. vitlab's own models are therefore traced on the meta device
(no memory, no arithmetic): the jit trace records the same operators with the same shapes as on
CPU. The one exception is ``nn.Conv*`` (torch's meta convolution cannot be traced), which runs on
CPU with zero weights for the duration of the trace -- the patch embedding, a fraction of a percent
of the work. Anything else that cannot run on meta tensors raises, and the caller retries with real
(zero) weights; nothing silently changes a count.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

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


# --- tracing ----------------------------------------------------------------------------------------

def _conv_on_cpu(conv: nn.Module):
    """A forward for a meta ``nn.Conv*`` that runs the same convolution on CPU zeros and hands
    a meta tensor on: the traced graph holds a real ``aten::_convolution`` with the true shapes."""
    weight = torch.zeros(conv.weight.shape, dtype=conv.weight.dtype)
    bias = torch.zeros(conv.bias.shape, dtype=conv.bias.dtype) if conv.bias is not None else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":
            return type(conv).forward(conv, x)
        real = torch.zeros(x.shape, dtype=x.dtype)
        return conv._conv_forward(real, weight, bias).to("meta")

    return forward


@contextlib.contextmanager
def meta_convolutions(module: nn.Module) -> Iterator[None]:
    patched = []
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.weight.device.type == "meta":
            m.forward = _conv_on_cpu(m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def trace(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Counts:
    """fvcore's ``JitModelAnalysis`` with vitlab's combined handles: one trace gives FLOPs,
    activations and free-op tallies per module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import scripts functions: torch.jit deprecation
        from fvcore.nn.jit_analysis import JitModelAnalysis

    analysis = JitModelAnalysis(module, inputs).set_op_handle(**combined_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings(), meta_convolutions(module), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings
        stats = analysis.by_module_and_operator()
    return Counts(
        by_module_op={k: Counter(v) for k, v in stats.items()},
        unsupported=Counter(analysis.unsupported_ops("")),
    )


def flop_counter_total(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """``torch.utils.flop_counter.FlopCounterMode`` on one eager forward (2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    if not all(t.device.type == "meta" for t in inputs):
        # shapes are all it needs: run on meta stand-ins of the weights and inputs (no arithmetic);
        # a module that cannot run on meta tensors gets a real forward instead
        try:
            state = {k: torch.empty_like(v, device="meta") for k, v in
                     list(module.named_parameters()) + list(module.named_buffers())}
            meta_inputs = tuple(torch.empty_like(t, device="meta") for t in inputs)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                torch.func.functional_call(module, state, meta_inputs)
            return int(counter.get_total_flops())
        except Exception:  # noqa: BLE001  (any failure: count with the real forward)
            pass
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], second_opinion: bool = True) -> Counts:
    """Trace ``module`` on ``inputs`` (wherever they live) and, optionally, run ``FlopCounterMode``."""
    counts = trace(module, inputs)
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


def activations(counts: Counts) -> int:
    return counts.total(ACTS)
