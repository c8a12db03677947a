"""vitlab's built-in components, registered through the same hook as any external plugin."""
from __future__ import annotations

from ..hookspecs import hookimpl
from . import attention, block, map_pool, mlp, norm, patch_embed, pool, pos_embed

MODULES = (patch_embed, pos_embed, attention, mlp, norm, block, pool, map_pool)


@hookimpl
def vitlab_register_components(register) -> None:
    for module in MODULES:
        for cls in module.COMPONENTS:
            register(cls)
