"""What makes two pieces of a model cost the same: the keys a derived count (``vitlab.analysis.pieces``)
groups blocks by, and that the timm bridge uses to tell a hybrid's blocks apart.

Exact when blocks of equal structure on equal inputs cost the same, which holds for every built-in
(blocks differ only in their index and stochastic-depth rate, both inert in inference).
"""
from __future__ import annotations

from torch import nn

from ..state import ForwardState

_INERT = (nn.Dropout, nn.Identity)
_SIMPLE = (int, float, bool, str, tuple, type(None))


def _is_inert(module: nn.Module) -> bool:
    return isinstance(module, _INERT) or type(module).__name__ == "DropPath"


def signatures(module: nn.Module) -> tuple[tuple, tuple]:
    """``(inference, training)`` signatures of ``module`` (see :func:`block_signature`), in one pass."""
    parts, inference, training = [], [], []
    for name, m in module.named_modules():
        inert = _is_inert(m)
        # identity in eval: DropPath(0.1) ~ Identity ~ Dropout
        parts.append((name, "inert", "") if inert else (name, type(m).__qualname__, m.extra_repr()))
        # plain attributes (``num_heads``, ``head_dim``, ``eps`` ...): heads 3 and 6 have the same
        # weight shapes; a dropout-like module's rate only as zero or not (a mask saved or not)
        attrs = tuple(sorted((k, bool(v) if inert and isinstance(v, float) else v) for k, v in vars(m).items()
                             if not k.startswith("_") and k != "training" and isinstance(v, _SIMPLE)))
        training.append((name, attrs))
        if not inert:
            inference.append((name, attrs))
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        parts.append((name, tuple(t.shape), str(t.dtype)))
    head = (type(module).__qualname__, repr(getattr(module, "params", None)), tuple(parts))
    return (*head, tuple(inference)), (*head, tuple(training))


def block_signature(block: nn.Module, training: bool = False) -> tuple:
    """What makes two blocks cost the same: module types and settings (``extra_repr`` and plain
    attributes), parameter and buffer shapes. Dropout / stochastic-depth rates are left out (inert
    in inference, they never cost a FLOP) unless ``training`` (memory: whether masks are saved)."""
    return signatures(block)[training]


def distinct_blocks(blocks: nn.ModuleList) -> list[list[int]]:
    """Indices of the blocks grouped by signature, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, block in enumerate(blocks):
        groups.setdefault(block_signature(block), []).append(i)
    return list(groups.values())


def state_key(state: ForwardState) -> tuple:
    """What of a forward state can change a block's cost: token layout and position tensors' shapes."""
    def shape(t):
        return None if t is None else tuple(t.shape)

    return (state.grid, state.num_prefix, state.num_tokens, state.qk_transform is not None,
            shape(state.attn_bias), shape(state.token_weights))


def keeps_state(before: ForwardState, after: ForwardState) -> bool:
    """The state out of a piece equals the state in (up to the block index): reusing the piece's
    counts needs no re-run to learn the next state."""
    return (after.grid == before.grid and after.num_prefix == before.num_prefix and after.num_tokens == before.num_tokens
            and after.qk_transform is before.qk_transform and after.attn_bias is before.attn_bias
            and after.token_weights is before.token_weights)
