"""The small build context every component receives instead of the whole spec.

It carries the sizes components share (width, heads, patch grid, prefix tokens, block index) and
where to allocate (device, dtype). Components never see ``ViTSpec``, so plugins stay independent of
how the recipe format evolves.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class BuildContext:
    """Shared sizes and allocation settings handed to every component constructor.

    Args:
        embed_dim: token width D.
        num_heads: attention heads; ``embed_dim % num_heads == 0`` is checked by the spec where the
            attention splits the width (``Attention.splits_width``).
        mlp_hidden_dim: hidden width of the MLP, ``int(embed_dim * mlp_ratio)``.
        img_size: input image (height, width) in pixels.
        patch_size: patch (height, width) in pixels.
        in_chans: image channels.
        grid_size: patch grid (rows, cols) the patch embedder produces at ``img_size``.
        class_token: whether a class token leads the sequence.
        reg_tokens: number of register tokens after the class token.
        depth: number of blocks (all stages).
        block_index: index of the block being built (global across stages), ``None`` outside blocks.
        stage_index: the stage being built (0 without ``stages``); ``embed_dim``, ``num_heads``
            and ``grid_size`` are that stage's.
        in_dim: for a transition, the width of the stage it receives; ``None`` elsewhere.
        drop_path: stochastic-depth rate of this block (the spec's rate, scaled linearly by depth).
        proj_drop: dropout after attention / MLP output projections.
        device, dtype: where and how parameters are allocated (``device="meta"`` allocates nothing).
    """

    embed_dim: int
    num_heads: int
    mlp_hidden_dim: int
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    grid_size: tuple[int, int]
    class_token: bool
    reg_tokens: int
    depth: int
    block_index: int | None = None
    stage_index: int = 0
    in_dim: int | None = None
    drop_path: float = 0.0
    proj_drop: float = 0.0
    dynamic_img_size: bool = False
    device: Any = None
    dtype: Any = None
    # Builds the spec's selected component of a kind with a given context; set by the model
    # builder so that a block can build "the attention of this recipe" without seeing the recipe.
    _factory: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def factory_kwargs(self) -> dict[str, Any]:
        """``{"device": ..., "dtype": ...}`` for torch constructors: both always travel together."""
        return {"device": self.device, "dtype": self.dtype}

    def replace(self, **changes: Any) -> "BuildContext":
        return dataclasses.replace(self, **changes)

    def make(self, kind: str, **kwargs: Any):
        """Build the recipe's selected component of ``kind`` (e.g. ``"norm"``) with this context.

        Extra keyword arguments go to the component constructor (``dim=`` for norms).
        """
        if self._factory is None:
            raise RuntimeError("this BuildContext has no component factory (built outside build_model)")
        return self._factory(kind, self, **kwargs)
