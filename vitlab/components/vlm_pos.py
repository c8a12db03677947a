"""Position encodings of vision-language towers, both RoPE with a learned absolute table:

* ``rope_table`` (Qwen3-VL): axial RoPE (the ``rope`` component) plus a learned table on a fixed
  grid of its own, bilinearly resampled (``align_corners=True``) to every input grid;
* ``rope_axes`` (Gemma 4; HF's multidimensional RoPE): each axis rotates its own half of the
  head, plus optional learned per-axis tables added as ``table[0][x] + table[1][y]``, looked up
  by a one-hot product as timm and HF compute it (so that counted FLOPs follow theirs).

Prefix tokens (class, registers) are neither rotated nor given a table row, as in ``rope``.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import PosEncoding
from ..context import BuildContext
from ..state import ForwardState, QKTransform
from ..limits import LIMITS
from .rope import RotaryPosEmbed, rotate_pairs


def _check_rope(ctx: BuildContext) -> None:
    if ctx.head_dim % 4:
        raise ValueError(f"needs head_dim ({ctx.head_dim}) divisible by 4: sine and cosine per axis")


def _add_to_patches(x: torch.Tensor, pe: torch.Tensor, skip: int) -> torch.Tensor:
    """x (B, P + N, D) with pe (1 or B, N, D) added to the N patch tokens."""
    return torch.cat([x[:, :skip], x[:, skip:] + pe], dim=1) if skip else x + pe


class TableRope(PosEncoding):
    """Axial RoPE plus a learned table on a fixed grid, bilinearly resampled (align_corners) to
    every input grid (Qwen3-VL's vision encoder)."""

    name = "rope_table"

    class Params(PosEncoding.Params):
        temperature: float = Field(10_000.0, gt=0.0, description="RoPE frequency base")
        rotate_half: StrictBool = True  # pair channel i with i + head_dim/2 (Qwen) or with its neighbour
        grid_indexing: Literal["ij", "xy"] = "ij"  # which axis takes the first frequency band
        table_grid: Optional[tuple[int, int]] = Field(
            None, description="the learned table's own grid (Qwen: 48 x 48); null = the build-time patch grid")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        _check_rope(ctx)
        if params.table_grid is not None and min(params.table_grid) < 1:
            raise ValueError(f"needs a table grid of at least 1 x 1, got {params.table_grid}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.rope = RotaryPosEmbed(ctx, RotaryPosEmbed.Params(
            temperature=params.temperature, rotate_half=params.rotate_half, grid_indexing=params.grid_indexing))
        self.table_grid = tuple(params.table_grid or ctx.grid_size)
        self.skip = ctx.num_prefix_tokens
        gh, gw = self.table_grid
        self.weight = nn.Parameter(torch.empty(1, gh * gw, ctx.embed_dim, **ctx.factory_kwargs))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The table at ``grid``: (1, gh * gw, D); resampled in float32 (as timm's Qwen3-VL)."""
        if tuple(grid) == self.table_grid:
            return self.weight
        D = self.weight.shape[-1]
        t = self.weight.reshape(1, *self.table_grid, D).permute(0, 3, 1, 2).float()  # (1, D, th, tw)
        t = F.interpolate(t, size=tuple(grid), mode="bilinear", align_corners=True)
        return t.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D).to(self.weight.dtype)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        return _add_to_patches(x, self.table(state.grid).to(x.dtype), self.skip)

    def qk_transform(self, grid: tuple[int, int]) -> QKTransform:
        return self.rope.qk_transform(grid)

    def extra_repr(self) -> str:
        return f"table_grid={self.table_grid}"


class AxisRope(PosEncoding):
    """RoPE with each axis rotating its own half of the head (Gemma 4), plus optional learned
    per-axis tables looked up by patch coordinate."""

    name = "rope_axes"

    class Params(PosEncoding.Params):
        temperature: float = Field(100.0, gt=0.0, description="frequency base (Gemma 4: 100)")
        rotate_half: StrictBool = True  # within an axis's half: pair channel i with i + head_dim/4, or neighbours
        grid_indexing: Literal["ij", "xy"] = "xy"  # which axis takes the first half (xy: columns, Gemma's x)
        axis_table: Optional[int] = Field(
            None, gt=0, le=LIMITS["img_size"], description="positions per axis of the learned tables (Gemma 4: 10240); null = none")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        _check_rope(ctx)
        if params.axis_table is not None and max(ctx.grid_size) > params.axis_table:
            raise ValueError(f"a table of {params.axis_table} positions per axis cannot cover the "
                             f"{ctx.grid_size[0]}x{ctx.grid_size[1]} patch grid")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.skip = ctx.num_prefix_tokens
        bands = ctx.head_dim // 4  # per axis: head_dim / 2 channels, a sine and a cosine per band
        freqs = 1.0 / params.temperature ** (torch.arange(bands, dtype=torch.float32) / bands)
        # Not persistent: a function of the params, not a weight. float32: angles need the precision.
        self.register_buffer("freqs", freqs.to(ctx.device), persistent=False)
        self.axis_table = None
        if params.axis_table is not None:
            self.axis_table = nn.Parameter(torch.empty(2, params.axis_table, ctx.embed_dim, **ctx.factory_kwargs))
            nn.init.trunc_normal_(self.axis_table, std=0.02)

    def coords(self, grid: tuple[int, int]) -> torch.Tensor:
        """Integer patch coordinates (gh * gw, 2), row-major, (row, col) for ``ij``, (col, row) for ``xy``."""
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        axes = (rows, cols) if self.params.grid_indexing == "ij" else (cols, rows)
        return torch.stack(axes, dim=-1).flatten(0, 1).to(self.freqs.device)  # on meta when counting

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if self.axis_table is None:
            return x
        size = self.axis_table.shape[1]
        if max(state.grid) > size:
            raise ValueError(f"a table of {size} positions per axis cannot cover the "
                             f"{state.grid[0]}x{state.grid[1]} patch grid")
        B = x.shape[0]
        # one-hot rows (B, 2, N, size) @ tables (2, size, D) -> (B, 2, N, D), summed over the two axes
        coords = self.coords(state.grid)  # (N, 2)
        one_hot = (coords[..., None] == torch.arange(size, device=coords.device)).to(self.axis_table)
        pe = (one_hot.permute(1, 0, 2).expand(B, -1, -1, -1) @ self.axis_table).sum(dim=1)
        return _add_to_patches(x, pe.to(x.dtype), self.skip)

    def qk_transform(self, grid: tuple[int, int]) -> QKTransform:
        angles = self.coords(grid).float()[:, :, None] * self.freqs  # (N, 2, bands)
        if self.params.rotate_half:
            angles = torch.cat([angles, angles], dim=-1)  # (N, 2, head_dim / 2): [f, f] within each half
        else:
            angles = angles[..., None].expand(*angles.shape, 2).flatten(-2)  # [f0, f0, f1, f1, ...]
        sin, cos = angles.sin(), angles.cos()
        half, patches = self.params.rotate_half, sin.shape[0]

        def rope(x: torch.Tensor) -> torch.Tensor:
            # (B, heads, P + N, head_dim) -> each axis's half (..., N, 2, head_dim / 2) rotated on its own
            P = x.shape[-2] - patches
            t = x[..., P:, :]
            t = t.reshape(*t.shape[:-1], 2, t.shape[-1] // 2)
            t = (t * cos + rotate_pairs(t, half) * sin).flatten(-2).to(x.dtype)
            return torch.cat([x[..., :P, :], t], dim=-2) if P else t

        return lambda q, k: (rope(q), rope(k))

    def extra_repr(self) -> str:
        return f"axis_table={None if self.axis_table is None else tuple(self.axis_table.shape)}"


COMPONENTS = (TableRope, AxisRope)
