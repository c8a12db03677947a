"""fvcore operator handles: what vitlab adds to fvcore's own, and which operators are free.

Conventions are fvcore's (``fvcore/nn/jit_handles.py``): one fused multiply-add counts 1 (so a
(M, K) x (K, N) product is M·K·N), bias additions are not counted, ``aten::layer_norm`` costs 5 per
element with an affine transform (4 without), and activations are the output elements of
conv / linear / matmul-like operators (``ActivationCountAnalysis``).

What plain fvcore misses on vitlab's built-ins, and what vitlab does about it:

* ``aten::scaled_dot_product_attention`` (the fused attention every built-in uses): counted as
  q·kᵀ plus attn·v, ``B·h·Nq·Nk·hd + B·h·Nq·Nk·hd_v`` multiply-adds -- exactly what fvcore counts
  for the two ``aten::matmul`` of the unfused path (``Attention.record_maps``, timm's
  ``fused_attn=False``), so fused and unfused attention give identical totals. Its activations are
  the attention matrix plus the output, again what the two unfused matmuls produce. The scale, the
  softmax and an additive mask are free, as they are on the unfused path. A causal mask is not
  halved (neither is the unfused matmul).
* ``aten::rms_norm``: 4 per element with a weight, 3 without -- fvcore's layer-norm estimate
  less the centring RMSNorm skips.
* ``aten::upsample_bicubic2d`` / ``aten::_upsample_bicubic2d_aa`` (resampling learned position
  tables for another image size): 16 per output element, one per tap, as fvcore counts 4 for
  bilinear.

Every other operator the built-ins emit is free by the same convention that makes timm's and most
papers' GFLOPs tables: :data:`FREE_OPS` names each with the reason. Free operators are still
counted by occurrence and shown in a report's ``free_ops``; anything neither counted nor free
lands in ``unsupported``.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Mapping, NamedTuple

from ..components.flops import (  # noqa: F401  (the built-ins' rules, re-exported)
    EXTRA_ACTIVATION_HANDLES,
    EXTRA_FLOP_HANDLES,
    FREE_OPS,
    rms_norm_flops,
    sdpa_activations,
    sdpa_flops,
)
from ..registry import BUILTIN, OpRule, Registry

NORM_OPS = frozenset({"aten::layer_norm", "aten::group_norm", "aten::instance_norm", "aten::batch_norm", "aten::rms_norm"})
"""Operators ``torch.utils.flop_counter.FlopCounterMode`` does not count (its known difference)."""


# --- which rule counts an operator -------------------------------------------------------------------
#
# Rules come from ``vitlab_flop_handles`` (``registry.op_declarations``: built-ins and plugins
# alike) and from fvcore. Inside a component, the innermost enclosing component whose plugin
# declared the operator decides; everywhere else the built-ins' declaration, then fvcore's
# handles, then the first plugin's declaration. So a plugin counts its own components as it says
# without changing how anyone else's are counted, and two plugins may declare the same operator.


class Counting(NamedTuple):
    """How one operator is counted: fvcore-style handles (or ``None``) and, if free, the reason."""

    flops: Callable[[list[Any], list[Any]], Any] | None
    activations: Callable[[list[Any], list[Any]], Any] | None
    free: str | None


def _declared(rule: OpRule) -> Counting:
    return Counting(rule.flops, rule.activations, rule.free)


def _fvcore_handles() -> tuple[dict[str, Callable], dict[str, Callable]]:
    from fvcore.nn.activation_count import _DEFAULT_SUPPORTED_OPS as acts
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS as flops

    return flops, acts


def default_counting(registry: Registry) -> dict[str, Counting]:
    """op -> how it is counted outside the components of the plugins that declared it (imports fvcore)."""
    fv_flops, fv_acts = _fvcore_handles()
    out = {op: Counting(fv_flops.get(op), fv_acts.get(op), None) for op in {*fv_flops, *fv_acts}}
    for op, first in registry.op_rules.items():
        if first.provider == BUILTIN or op not in out:
            out[op] = _declared(first)
    return out


# Keys of the combined counters below: one trace yields FLOPs, activations and free-op tallies.
FLOPS, ACTS, FREE = "flops", "acts", "free"


def combined_handles(
    registry: Registry, scopes: Mapping[str, str] | None = None
) -> dict[str, Callable[[list[Any], list[Any]], Counter]]:
    """One handle per operator returning ``Counter({(FLOPS, op): n, (ACTS, op): n, (FREE, op): 1})``.

    fvcore's ``JitModelAnalysis`` sums these per module, so a single trace gives FLOPs
    (as ``FlopCountAnalysis``), activations (as ``ActivationCountAnalysis``) and how often each
    free operator ran. fvcore drops zero entries from its counters, which is what we want.

    Args:
        registry: where declared rules come from: the registry the model was built with.
        scopes: traced module name -> provider of the component that module is. With it, an
            operator run inside a plugin's component is counted by that plugin's declaration.
    """
    out: dict[str, Callable] = {}
    for op, default in default_counting(registry).items():
        own = {r.provider: _declared(r) for r in registry.op_declarations.get(op, ())}
        if not scopes or all(c == default for c in own.values()):
            own = {}  # counted the same wherever it runs: no need to look at the scope
        out[op] = _combine(op, default, own, scopes or {})
    return out


def _scoped(outputs: list[Any], own: dict[str, Counting], scopes: Mapping[str, str]) -> Counting | None:
    """The declaration of the innermost component around this node whose plugin declared the op.

    fvcore pushes each module's name as a trace scope while tracing, so a node's ``scopeName()``
    is the path of module names from the root (``/blocks.0/blocks.0.attn``)."""
    if not outputs:
        return None
    for name in reversed(outputs[0].node().scopeName().split("/")):
        provider = scopes.get(name)
        if provider in own:
            return own[provider]
    return None


def _number(x: Any) -> Any:
    """fvcore handles may return a number or a Counter ({"conv": n}); we only want the number."""
    if isinstance(x, Counter) or isinstance(x, dict):
        return sum(x.values())
    return x


def _combine(op: str, default: Counting, own: dict[str, Counting], scopes: Mapping[str, str]) -> Callable:
    def handle(inputs: list[Any], outputs: list[Any]) -> Counter:
        flop, act, free = (_scoped(outputs, own, scopes) if own else None) or default
        c: Counter = Counter()
        if flop is not None:
            c[(FLOPS, op)] = _number(flop(inputs, outputs))
        if act is not None:
            c[(ACTS, op)] = _number(act(inputs, outputs))
        if free:
            c[(FREE, op)] = 1
        return c

    return handle
