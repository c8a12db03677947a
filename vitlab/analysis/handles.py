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
from math import prod
from typing import Any, Callable, Mapping, NamedTuple

from ..registry import BUILTIN, OpRule, Registry

# --- free operators, with why ---------------------------------------------------------------------

_ADD = "addition: residual branches, position embeddings, biases and masks are not multiply-adds"
_SCALE = "elementwise scaling (layer scale, attention scale, SwiGLU gate) or integer shape arithmetic"
_ACT = "activation / softmax: elementwise, not counted by fvcore or in published GFLOPs"
_POOL = "mean over tokens (average pooling): additions only"
_TABLE = "position-table construction (sin/cos, powers, index grids): elementwise, input-independent"
_MEM = "memory or shape operation"

FREE_OPS: dict[str, str] = {
    "aten::add": _ADD,
    "aten::add_": _ADD,
    "aten::sub": _ADD,
    "aten::rsub": _ADD,
    "aten::mul": _SCALE,
    "aten::mul_": _SCALE,
    "aten::div": _SCALE,
    "aten::div_": _SCALE,
    "aten::neg": _SCALE,
    "aten::gelu": _ACT,
    "aten::silu": _ACT,
    "aten::sigmoid": _ACT,
    "aten::tanh": _ACT,
    "aten::softmax": _ACT,
    "aten::mean": _POOL,
    "aten::sin": _TABLE,
    "aten::cos": _TABLE,
    "aten::pow": _TABLE,
    "aten::reciprocal": _TABLE,
    "aten::meshgrid": _TABLE,
    "aten::pad": _MEM,
    "aten::bernoulli_": _MEM,
    "aten::feature_dropout": _MEM,
    "aten::alias": _MEM,
    "aten::lift_fresh": _MEM,
    "aten::sum": "a sum of a few parameter products (differential attention's λ): additions only",
    # XCiT's cross-covariance attention L2-normalises queries and keys (``F.normalize``)
    "aten::linalg_vector_norm": "vector norm (XCA's L2-normalised queries and keys): squares and a sum, "
                                "no handle in fvcore, which counts timm's XCA with it at 0 too",
    "aten::clamp_min": "elementwise floor (against dividing by a zero norm), as fvcore ignores aten::clamp",
    "aten::expand_as": _MEM,
    # hybrid CNN stems (timm's ResNetV2 / ResNet-D / StdConv2dSame inside ``patch_embed: hybrid``)
    "aten::max_pool2d": "max pooling (a CNN stem's): comparisons, not multiply-adds; fvcore does not count it",
    "aten::avg_pool2d": "average pooling (ResNet-D's downsampling shortcut): additions only; fvcore does not count it",
    "aten::ceil": _SCALE,  # TF 'SAME' padding computed from the input size
    "aten::reshape_as": _MEM,
}
"""Operators counted as 0 FLOPs on purpose. fvcore's own ``_IGNORED_OPS`` (reshapes, copies,
``cat``, ``dropout``, ``relu``, ...) are ignored before these are looked at."""


# --- shapes of jit values ---------------------------------------------------------------------------

def _shape(value: Any) -> list[int] | None:
    """The sizes of a traced tensor value, ``None`` when unknown or not a tensor (``None`` args)."""
    try:
        return value.type().sizes() if value.isCompleteTensor() else None
    except RuntimeError:
        return None


def sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::scaled_dot_product_attention(q, k, v, ...)``: q·kᵀ and attn·v multiply-adds."""
    q, k, v = (_shape(x) for x in inputs[:3])
    rows = prod(q[:-1])  # B·h·Nq (any leading dims)
    nk = k[-2]
    return rows * nk * q[-1] + rows * nk * v[-1]


def sdpa_activations(inputs: list[Any], outputs: list[Any]) -> int:
    """The attention matrix (B·h·Nq·Nk) plus the output, as the two unfused matmuls produce."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    return prod(q[:-1]) * k[-2] + prod(_shape(outputs[0]))


def rms_norm_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::rms_norm(input, normalized_shape, weight, eps)``: 4 per element with weight, 3 without."""
    has_weight = len(inputs) > 2 and _shape(inputs[2]) is not None
    return prod(_shape(inputs[0])) * (4 if has_weight else 3)


def _per_output(scale: int) -> Callable[[list[Any], list[Any]], int]:
    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        return scale * prod(_shape(outputs[0]))

    return handle


EXTRA_FLOP_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::scaled_dot_product_attention": sdpa_flops,
    "aten::rms_norm": rms_norm_flops,
    "aten::upsample_bicubic2d": _per_output(16),
    "aten::_upsample_bicubic2d_aa": _per_output(16),
    # NaFlex position tables: antialiased bilinear (4 taps, as fvcore counts plain bilinear), and the
    # factorized tables' linear resampling (2 taps)
    "aten::_upsample_bilinear2d_aa": _per_output(4),
    "aten::upsample_linear1d": _per_output(2),
}
"""Multiply-add handles for operators plain fvcore leaves unsupported."""

EXTRA_ACTIVATION_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::scaled_dot_product_attention": sdpa_activations,
}

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


def flop_handles(registry: Registry) -> dict[str, Callable]:
    """fvcore's default FLOP handles plus those declared by vitlab and plugins (see above)."""
    return {op: c.flops for op, c in default_counting(registry).items() if c.flops is not None}


def activation_handles(registry: Registry) -> dict[str, Callable]:
    """fvcore's default activation handles (``ActivationCountAnalysis``) plus declared ones."""
    return {op: c.activations for op, c in default_counting(registry).items() if c.activations is not None}


def free_ops(registry: Registry) -> dict[str, str]:
    """Operators counted as 0 on purpose, with the reason (``FREE_OPS`` plus plugins')."""
    return {op: c.free for op, c in default_counting(registry).items() if c.free}


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
