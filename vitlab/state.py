"""The per-forward state every block, attention, position encoding and transition receives.

A ViT's tokens live on a patch grid that can change during a forward: another image size
(``dynamic_img_size``), a stage transition that pools the grid (PiT), a block that merges tokens
(ToMe). Components that depend on it (window attention, RoPE, position generators, attention maps)
read it here instead of capturing the build-time grid, so they stay right for every variant.

A component that changes the tokens returns a new state (``state.regrid(...)``); the position
encoding's q/k transform and attention bias are then recomputed for the new grid.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .component import PosEncoding

# (q, k) -> (q, k), both (B, heads, N, head_dim): how a position encoding acts inside attention.
# A transform that differs per block (RoPE with learned per-block frequencies) has an attribute
# ``per_block = True`` and is called as ``transform(q, k, block_index=i)`` (``transform_qk`` does).
QKTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ForwardState:
    """What a component may know about the tokens it is handed, for one forward pass.

    Args:
        grid: patch grid (rows, cols) of the patch tokens, or ``None`` once tokens no longer lie
            on a grid (merged tokens).
        num_prefix: class and register tokens leading the sequence.
        num_tokens: prefix plus patch tokens, N of the (B, N, D) input.
        block_index: index of the block being run (global across stages), ``None`` outside blocks.
        stage_index: stage of the model (0 without ``stages``).
        qk_transform: the position encoding's transform of queries and keys at this grid, or ``None``.
        attn_bias: an additive attention bias broadcastable to (B, heads, N, N), or ``None``.
        token_weights: (B, N) how many input patches each token stands for (size-weighted
            merging, ToMe's proportional attention), or ``None`` when every token counts once.
        positions: the model's position encoding, which recomputes ``qk_transform`` and
            ``attn_bias`` when the grid changes.
    """

    grid: tuple[int, int] | None
    num_prefix: int
    num_tokens: int
    block_index: int | None = None
    stage_index: int = 0
    qk_transform: QKTransform | None = field(default=None, repr=False, compare=False)
    attn_bias: torch.Tensor | None = field(default=None, repr=False, compare=False)
    token_weights: torch.Tensor | None = field(default=None, repr=False, compare=False)
    positions: "PosEncoding | None" = field(default=None, repr=False, compare=False)

    @classmethod
    def start(cls, grid: tuple[int, int], num_prefix: int, positions: "PosEncoding | None" = None) -> "ForwardState":
        """The state right after the patch embedding: every patch on ``grid``, positions applied."""
        blank = cls(tuple(grid), num_prefix, num_prefix + grid[0] * grid[1], positions=positions)
        return blank.with_positions()

    @property
    def num_patches(self) -> int:
        """Tokens after the prefix (patches, or merged groups of them)."""
        return self.num_tokens - self.num_prefix

    def replace(self, **changes: Any) -> "ForwardState":
        """A copy with ``changes``. (A shallow copy: ``dataclasses.replace`` re-runs ``__init__`` and
        costs several times more, paid per block and forward.)"""
        unknown = set(changes) - _FIELDS
        if unknown:
            raise TypeError(f"ForwardState has no field {sorted(unknown)[0]!r}")
        new = copy.copy(self)
        for key, value in changes.items():
            object.__setattr__(new, key, value)
        return new

    def with_positions(self) -> "ForwardState":
        """This state with the position encoding's transform and bias for its grid."""
        if self.positions is None or self.grid is None:
            return self.replace(qk_transform=None, attn_bias=None)
        return self.replace(
            qk_transform=self.positions.qk_transform(self.grid),
            attn_bias=self.positions.attn_bias(self.grid, self.num_prefix),
        )

    def regrid(self, grid: tuple[int, int] | None, num_tokens: int | None = None,
               num_prefix: int | None = None, **changes: Any) -> "ForwardState":
        """The state after tokens changed: a new grid (``None`` when tokens left the grid) and
        token count, with the position transform and bias recomputed for it.

        ``num_tokens`` defaults to prefix + grid size; it must be given when ``grid`` is ``None``.
        """
        prefix = self.num_prefix if num_prefix is None else num_prefix
        if num_tokens is None:
            if grid is None:
                raise ValueError("regrid(None) needs num_tokens: merged tokens have no grid to count")
            num_tokens = prefix + grid[0] * grid[1]
        state = self.replace(grid=None if grid is None else tuple(grid), num_tokens=num_tokens,
                             num_prefix=prefix, **changes)
        return state.with_positions()

    def transform_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the position encoding's q/k transform (identity when there is none); one that
        differs per block is handed this state's ``block_index``."""
        t = self.qk_transform
        if t is None:
            return q, k
        return t(q, k, block_index=self.block_index) if getattr(t, "per_block", False) else t(q, k)

    def check_tokens(self, x: torch.Tensor, who: str) -> None:
        """Raise ``ValueError`` naming ``who`` when ``x`` (B, N, D) does not hold this state's tokens."""
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"{who} got {x.shape[1]} tokens but the forward state says {self.num_tokens} "
                             f"({self.num_prefix} prefix + {self.num_patches}); a component changed the "
                             "tokens without returning a new state")


_FIELDS = frozenset(f.name for f in dataclasses.fields(ForwardState))


def as_output(result: Any, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
    """A block or transition returns tokens, or ``(tokens, new_state)`` when it changed them."""
    if isinstance(result, tuple):
        x, new_state = result
        return x, new_state
    return result, state
