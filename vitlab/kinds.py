"""The component kinds, by name: plain data that the CLI and the recipe format read without torch.

Kinds, in the order a recipe lists them: ``patch_embed``, ``pos_embed``, ``attention``, ``mlp``,
``norm``, ``block``, ``pool``, and ``transition`` (between the ``stages`` of a staged model). Their
base classes are in :mod:`vitlab.component`.
"""
from __future__ import annotations

KINDS: tuple[str, ...] = ("patch_embed", "pos_embed", "attention", "mlp", "norm", "block", "pool", "transition")
# the kinds a ``layers`` entry may override per block
BLOCK_KINDS: tuple[str, ...] = ("attention", "mlp", "norm", "block")
