"""The FLOP rules of vitlab's built-in components: how the operators they emit that plain fvcore
does not count are counted, and which operators are free and why. ``vitlab.components`` declares
them through ``vitlab_flop_handles`` like any plugin; ``vitlab.analysis.handles`` combines them
with fvcore's (see its docstring for the conventions: one fused multiply-add counts 1, bias
additions are free, activations are the outputs of conv / linear / matmul-like operators).

* ``aten::scaled_dot_product_attention``: q·kᵀ plus attn·v, ``B·h·Nq·Nk·hd + B·h·Nq·Nk·hd_v``
  multiply-adds, exactly what fvcore counts for the two ``aten::matmul`` of the unfused path, so
  fused and unfused attention give identical totals; its activations are the attention matrix
  plus the output, again what the two unfused matmuls produce.
* ``aten::rms_norm``: 4 per element with a weight, 3 without (fvcore's layer-norm estimate less
  the centring RMSNorm skips).
* resampling a position table: 16 per output element for bicubic (one per tap), 4 for
  antialiased bilinear, 2 for linear.
"""
from __future__ import annotations

from math import prod
from typing import Any, Callable

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
    "aten::tile": _MEM,  # abswin's window position table repeated over the grid (Hiera, SAM 2)
    "aten::hardswish": _ACT,  # LeViT
    # Swin v2's cosine attention: its learned logit scale, exp(min(s, ln 100)), per head
    "aten::exp": "exponential of a per-head logit scale (Swin v2's cosine attention): elementwise; fvcore does "
                 "not count it",
    # VOLO's outlook attention unfolds values into neighbourhoods and folds them back; its head takes a max
    "aten::im2col": "unfold (outlook attention's neighbourhoods): a copy; fvcore does not count it",
    "aten::col2im": "fold (outlook attention): overlapping neighbourhoods summed, additions only; fvcore does not "
                    "count it",
    "aten::max": "maximum over tokens (VOLO's token-labeling head): comparisons; fvcore does not count it",
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
