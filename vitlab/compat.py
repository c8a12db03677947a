"""Which selected components fit together, checked when a spec validates: pairs that no component's
own ``check`` can see, since each gets only its context and its own params.

* An attention with no place for a bias over token pairs (``Attention.takes_attn_bias = False``:
  XCiT's channel attention) under a position encoding that gives one, or with no place for a
  transform of queries and keys (``takes_qk_transform = False``: pooled keys) under one that gives
  one (RoPE).
* An MLP that needs the forward state (``Mlp.takes_state``: PVTv2's conv MLP on the grid) in a
  block that does not hand its MLP the state (``Block.gives_mlp_state``).

Each problem is located at the recipe entry that chose the component (the global field or the
``layers`` entry), once per entry.
"""
from __future__ import annotations

from typing import Iterable

from pydantic_core import InitErrorDetails

from .layout import BlockPlan
from .registry import Registry
from .selection import error_detail


def pairing_errors(pos_embed: str, plans: Iterable[BlockPlan], registry: Registry) -> list[InitErrorDetails]:
    """The problems of every block's selections with the spec's position encoding and each other."""
    pe = registry.get("pos_embed", pos_embed).cls
    gives = [(pe.gives_attn_bias(), "takes_attn_bias", "the attention bias", "a bias over token pairs"),
             (pe.gives_qk_transform(), "takes_qk_transform", "the transform of queries and keys", "RoPE")]
    errors, seen = [], set()
    for plan in plans:
        attn, mlp, block = (plan.selections[k] for k in ("attention", "mlp", "block"))
        taker = registry.get("attention", attn.name).cls
        for given, flag, what, example in gives:
            loc = plan.source["attention"]
            if given and not getattr(taker, flag) and (loc, flag) not in seen:
                seen.add((loc, flag))
                errors.append(error_detail(loc, f"{attn.name} has no place for {what} pos_embed '{pos_embed}' "
                                                f"gives ({example})", attn.name))
        if registry.get("mlp", mlp.name).cls.takes_state and not registry.get("block", block.name).cls.gives_mlp_state:
            loc = plan.source["mlp"]
            if loc not in seen:
                seen.add(loc)
                givers = [n for n in registry.names("block") if registry.get("block", n).cls.gives_mlp_state]
                errors.append(error_detail(loc, f"{mlp.name} needs the patch grid, which block '{block.name}' does "
                                                f"not hand its MLP; use a block that does: {', '.join(givers)}",
                                           mlp.name))
    return errors
