"""The hooks a vitlab plugin may implement. Every hook name carries the ``vitlab_`` prefix.

A plugin is a module (or object) with functions marked ``@vitlab.hookimpl``, published under the
``vitlab`` entry-point group::

    [project.entry-points.vitlab]
    rope = "vitlab_rope"

vitlab's own components register through these same hooks (see ``vitlab.components``).
"""
from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("vitlab")
hookimpl = pluggy.HookimplMarker("vitlab")


@hookspec
def vitlab_register_components(register: Callable[[type], None]) -> None:
    """Register component classes by calling ``register(ComponentClass)`` once per class.

    Args:
        register: takes a subclass of one of the kind bases in ``vitlab.component``
            (``PatchEmbed``, ``PosEncoding``, ``Attention``, ``Mlp``, ``Norm``, ``Block``, ``Pool``)
            that sets ``name`` and, optionally, a nested ``Params`` pydantic model. A name already
            registered for the same kind is an error naming both providers.

    Returns nothing; called once per plugin when the registry is built.
    """
