"""vitlab's built-in components, registered through the same hook as any external plugin."""
from __future__ import annotations

from ..hookspecs import hookimpl
from . import (
    attention, block, distilled, map_pool, mlp, norm, patch_embed, pool, pos_embed, relpos, rope, subln, transition,
    window,
)

MODULES = (patch_embed, pos_embed, rope, attention, subln, relpos, mlp, norm, block, pool, map_pool, distilled,
           transition, window)


@hookimpl
def vitlab_register_components(register) -> None:
    for module in MODULES:
        for cls in module.COMPONENTS:
            register(cls)


@hookimpl
def vitlab_flop_handles(register) -> None:
    """The operators built-ins emit that plain fvcore does not count (fused attention, RMSNorm,
    bicubic resampling) and those that are free by convention; see ``vitlab.analysis.handles``."""
    from ..analysis import handles

    for op, flops in handles.EXTRA_FLOP_HANDLES.items():
        register(op, flops=flops, activations=handles.EXTRA_ACTIVATION_HANDLES.get(op))
    for op, reason in handles.FREE_OPS.items():
        register(op, free=reason)
