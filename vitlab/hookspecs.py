"""The hooks a vitlab plugin may implement. Every hook name carries the ``vitlab_`` prefix.

A plugin is a module (or object) with functions marked ``@vitlab.hookimpl``, published under the
``vitlab`` entry-point group::

    [project.entry-points.vitlab]
    rope = "vitlab_rope"

The module also declares the plugin API it was written for, ``vitlab_api = 2`` (``VITLAB_API``):
an installed plugin that declares another version, or none (written for vitlab 0.1), fails at load
with one warning pointing to docs/migration.md, and the other plugins keep working.

vitlab's own components register through these same hooks (see ``vitlab.components``).
"""
from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("vitlab")
hookimpl = pluggy.HookimplMarker("vitlab")

# The plugin API this vitlab speaks. 2: ``forward(x, state)`` with a ``ForwardState``, ``regrid``,
# three hooks. A plugin module sets ``vitlab_api = 2``; docs/migration.md lists what changed.
VITLAB_API = 2


@hookspec
def vitlab_register_components(register: Callable[[type], None]) -> None:
    """Register component classes by calling ``register(ComponentClass)`` once per class.

    Args:
        register: takes a subclass of one of the kind bases in ``vitlab.component``
            (``PatchEmbed``, ``PosEncoding``, ``Attention``, ``Mlp``, ``Norm``, ``Block``, ``Pool``, ``Transition``)
            that sets ``name`` and, optionally, a nested ``Params`` pydantic model. The class is
            checked at once: ``Params`` must be a complete pydantic model, ``Params()`` must work
            and its defaults validate, and it must have a JSON schema; plain ``bool`` fields are
            made strict (``"no"`` and ``1`` refused) like the built-ins' ``StrictBool``.

    Returns nothing; called once per plugin when the registry is built. Whatever the plugin
    registers is kept only if all of it is valid: a bad class, a built-in name, or an exception
    from this hook makes the plugin fail as a whole (recorded in ``registry.failures``; strict
    loading raises). A name that two plugins register is ambiguous: recipes selecting it fail
    naming both, and both plugins stay loaded.
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
            nothing.

    Returns nothing; called once per plugin when the registry is built. A declaration counts the
    operator wherever it runs inside the plugin's own components; elsewhere vitlab's own
    declaration, then fvcore's handle, then the first plugin's declaration count it. So two
    plugins may declare the same operator (a warning names both when they may disagree). An
    operator that is neither counted nor free shows up in a report's ``unsupported`` list.
    """


@hookspec
def vitlab_timm_equivalents(register: Callable[[object], None]) -> None:
    """Declare the timm module each of your components is read from and written back as, so
    ``spec_from_timm``, ``load_timm_weights``, ``timm_kwargs`` and ``to_timm_state_dict`` handle
    it inside timm's ``VisionTransformer`` (see ``vitlab.timm_interop.equivalents``).

    Args:
        register: takes a ``vitlab.TimmEquivalent`` for an attention, MLP or block component this
            same plugin registers.

    Returns nothing; called once per plugin when the registry is built, after
    ``vitlab_register_components``. A bad declaration, one for another plugin's component, or a
    timm class another plugin already claimed makes the plugin fail as a whole, like a bad component.
    """
