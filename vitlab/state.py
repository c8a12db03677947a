"""The per-forward state every block, attention, position encoding and transition receives.

A ViT's tokens live on a patch grid that can change during a forward: another image size
(``dynamic_img_size``), a stage transition that pools the grid (PiT), a block that merges tokens
(ToMe). Components that depend on it (window attention, RoPE, position generators, attention maps)
read it here instead of capturing the build-time grid, so they stay right for every variant.

A component that changes the tokens returns a new state (``state.regrid(...)``): the position
encoding's q/k transform and attention bias are recomputed where the tokens still sit on a grid
(pooling), and marked lost where they do not (merging), so that whatever needs them afterwards
refuses naming the block that lost them instead of running without positions.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import SpecError

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
        grid_lost_at: the block that took the tokens off the patch grid (``regrid(None)``), or
            ``None`` while they are on it.
        positions_lost_at: the block that took the tokens off the grid while the position
            encoding acted inside attention (a q/k transform or an attention bias): those are lost
            from then on, and the model refuses to run attention without them. ``None`` otherwise,
            and also when the merging block carried positions itself (it passed ``qk_transform``
            or ``attn_bias`` to ``regrid``).
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
    grid_lost_at: int | None = None
    positions_lost_at: int | None = None

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
        """The state after tokens changed: a new grid and token count.

        On a grid (pooling, another stage) the position transform and bias are recomputed for it.
        Off the grid (``grid=None``: merged tokens) there is nothing to recompute them from: they
        are dropped and the state records which block lost them (``positions_lost_at``) unless
        ``changes`` carry them (a merging block that merges positions as it merges tokens passes
        its own ``qk_transform`` / ``attn_bias``).

        ``num_tokens`` defaults to prefix + grid size; it must be given when ``grid`` is ``None``.
        """
        prefix = self.num_prefix if num_prefix is None else num_prefix
        if num_tokens is None:
            if grid is None:
                raise ValueError("regrid(None) needs num_tokens: merged tokens have no grid to count")
            num_tokens = prefix + grid[0] * grid[1]
        state = self.replace(grid=None if grid is None else tuple(grid), num_tokens=num_tokens,
                             num_prefix=prefix, **changes)
        if grid is not None:  # back on a grid: positions recomputed for it
            return state.replace(grid_lost_at=None, positions_lost_at=None).with_positions()
        carried = "qk_transform" in changes or "attn_bias" in changes
        lost = self.grid is not None and not carried and (self.qk_transform is not None or self.attn_bias is not None)
        return state.replace(
            grid_lost_at=self.block_index if self.grid is not None else self.grid_lost_at,
            positions_lost_at=self.block_index if lost else self.positions_lost_at,
            **({} if carried else {"qk_transform": None, "attn_bias": None}),
        )

    def add_attn_bias(self, bias: torch.Tensor) -> "ForwardState":
        """A copy whose ``attn_bias`` is this state's plus ``bias`` (broadcast): a block's own
        bias (ToMe's proportional attention) composes with the position encoding's instead of
        replacing it."""
        return self.replace(attn_bias=bias if self.attn_bias is None else self.attn_bias + bias)

    def require_grid(self, who: str) -> tuple[int, int]:
        """The patch grid, or a one-line ``SpecError`` (a ``ValueError``) naming ``who`` and the
        block that merged the tokens off it: a recipe whose layout cannot run."""
        if self.grid is None:
            where = "an earlier block" if self.grid_lost_at is None else f"block {self.grid_lost_at}"
            raise SpecError(f"{who} needs tokens on a patch grid, but {where} merged them off it")
        return self.grid

    def transform_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the position encoding's q/k transform (identity when there is none); one that
        differs per block is handed this state's ``block_index``."""
        t = self.qk_transform
        if t is None:
            if self.positions_lost_at is not None:
                raise SpecError(self.positions_lost_message(f"attention in block {self.block_index}"))
            return q, k
        return t(q, k, block_index=self.block_index) if getattr(t, "per_block", False) else t(q, k)

    def check_tokens(self, x: torch.Tensor, who: str) -> None:
        """Raise ``ValueError`` naming ``who`` when ``x`` (B, N, D) does not hold this state's tokens."""
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"{who} got {x.shape[1]} tokens but the forward state says {self.num_tokens} "
                             f"({self.num_prefix} prefix + {self.num_patches}); a component changed the "
                             "tokens without returning a new state")

    def positions_lost_message(self, who: str = "attention") -> str:
        """One line: ``who`` needs the position encoding's part inside attention, which was lost."""
        name = getattr(self.positions, "name", "?")
        return (f"{who} needs pos_embed '{name}' (its q/k transform or attention bias), but block "
                f"{self.positions_lost_at} merged the tokens off the patch grid and lost it; use a position "
                "encoding added to the tokens (learned, sincos2d) or a merging block that carries positions "
                "(docs/plugins.md)")


_FIELDS = frozenset(f.name for f in dataclasses.fields(ForwardState))


def as_output(result: Any, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
    """A block or transition returns tokens, or ``(tokens, new_state)`` when it changed them."""
    if isinstance(result, tuple):
        x, new_state = result
        return x, new_state
    return result, state
