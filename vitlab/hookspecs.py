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


@hookspec
def vitlab_flop_handles(register: Callable[..., None]) -> None:
    """Declare how FLOP reports count the TorchScript operators your components emit.

    Args:
        register: ``register(op, *, flops=None, activations=None, free=None)`` once per operator:
            ``op`` is the traced name (``"aten::elu"``); ``flops`` and ``activations`` are fvcore
            handles ``(inputs, outputs) -> int`` (multiply-adds, one per fused multiply-add, and
            output elements); ``free`` is the reason an operator costs nothing (``"activation"``).
            Operators fvcore already counts (linear, matmul, einsum, conv, bmm, layer_norm) need
            nothing. An operator declared by two plugins is an error naming both.

    Returns nothing; called once per plugin when the registry is built. An operator that is
    neither counted nor free shows up in a report's ``unsupported`` list.
    """
