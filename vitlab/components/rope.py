"""Rotary position embedding (RoPE) on queries and keys, in the variants timm's EVA family uses:

* ``axial`` (EVA-02, Perception Encoder, timm's ``vit_*_rope_*``; timm ``RotaryEmbeddingCat``):
  integer patch coordinates (plus ``grid_offset``, optionally rescaled to a reference grid), band
  ``t`` turning by ``temperature ** (-t / bands)`` per patch step;
* ``dinov3`` (timm ``RotaryEmbeddingDinoV3``): patch centres normalised to [-1, 1], periods
  ``temperature ** (2t / (head_dim / 2))`` (or a geometric ``min_period`` .. ``max_period`` range),
  with DINOv3's train-time coordinate augmentations;
* ``mixed`` (RoPE-Mixed, timm ``RotaryEmbeddingMixed``): learned frequencies per block and head,
  ``freqs`` (2, depth, heads, head_dim / 2), each channel turning with both coordinates (its x and y
  frequency); the axial magnitudes turned by a random angle at initialisation. Block ``i`` rotates
  with ``freqs[:, i]``, so its transform takes the block index (``ForwardState.transform_qk``).

Axial and DINOv3 give each axis a quarter of the head's channels per sine and cosine; ``rotate_half`` chooses
which channels pair up (halves, as Llama and DINOv3, or neighbours, as EVA). Prefix tokens are
not rotated. Optionally a learned absolute table is added as well (timm ``use_abs_pos_emb``).

The ``vitlab-rope`` plugin (``rope2d``) stays a separate example: RoPE-ViT's layout (columns first,
angle 0 for prefix tokens) is another function.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from pydantic import Field, StrictBool
from torch import nn

from ..component import PosEncoding
from ..context import BuildContext
from ..state import ForwardState, QKTransform
from .pos_embed import LearnedPosEmbed


def _grid_coords(grid: tuple[int, int], variant: str, offset: float, indexing: str,
                 ref_grid: tuple[int, int] | None, normalize: str) -> torch.Tensor:
    """Coordinates (gh * gw, 2) of the patches, row-major; channel order (row, col) for ``ij``."""
    shape = list(grid) if indexing == "ij" else [grid[1], grid[0]]
    ref = None if ref_grid is None else (list(ref_grid) if indexing == "ij" else [ref_grid[1], ref_grid[0]])
    if variant == "dinov3":
        denom = {"max": [float(max(shape))] * 2, "min": [float(min(shape))] * 2, "separate": [float(s) for s in shape]}
        axes = [(torch.arange(0.5, s, dtype=torch.float32) + offset) / d for s, d in zip(shape, denom[normalize])]
    else:
        axes = [torch.arange(s, dtype=torch.int64).to(torch.float32) + offset for s in shape]
    if ref is not None:  # EVA's fine-tuning scheme: the grid spans the pretraining grid
        axes = [a / f * r for a, f, r in zip(axes, shape, ref)]
    coords = torch.stack(torch.meshgrid(axes, indexing=indexing), dim=-1)  # (gh, gw, 2) for ij
    if variant == "dinov3":
        coords = 2.0 * coords - 1.0  # [0, 1] -> [-1, 1]
    return coords.flatten(0, -2)  # (N, 2)


def _augment(coords: torch.Tensor, shift: float | None, jitter: float | None, rescale: float | None) -> torch.Tensor:
    """DINOv3's train-time transform of all coordinates: a shift, a per-axis and a shared
    log-uniform scale (timm's ``_apply_coord_augs``, same draws in the same order)."""
    n = coords.shape[-1]
    if shift is not None:
        coords = coords + torch.empty(n).uniform_(-shift, shift)[None, :]
    if jitter is not None:
        coords = coords * torch.empty(n).uniform_(-math.log(jitter), math.log(jitter)).exp()[None, :]
    if rescale is not None:
        coords = coords * torch.empty(1).uniform_(-math.log(rescale), math.log(rescale)).exp()
    return coords


def _mixed_init(bands: int, depth: int, heads: int, temperature: float) -> torch.Tensor:
    """RoPE-Mixed's initial frequencies (timm ``init_random_2d_freqs``), (2, depth, heads, 2 * bands):
    per block and head the axial magnitudes turned by one random angle, x parts first, y second."""
    mag = 1.0 / temperature ** (torch.arange(bands, dtype=torch.float32) / bands)  # (bands,)
    angles = torch.rand(depth, heads, 1) * 2 * math.pi
    fx = torch.cat([mag * torch.cos(angles), mag * torch.cos(angles + math.pi / 2)], dim=-1)
    fy = torch.cat([mag * torch.sin(angles), mag * torch.sin(angles + math.pi / 2)], dim=-1)
    return torch.stack([fx, fy])


def rotate_pairs(x: torch.Tensor, half: bool) -> torch.Tensor:
    """Each pair (a, b) of the last dim -> (-b, a): the pairs are the two halves (``half``, timm's
    and HF's ``rotate_half``) or neighbouring elements (the interleaved layout)."""
    if half:  # (x1, x2) -> (-x2, x1) on the two halves
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)  # neighbours (a, b) -> (-b, a)


def _apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, half: bool) -> torch.Tensor:
    """x (B, heads, P + N, head_dim) rotated by sin / cos (N, head_dim), or (heads, N, head_dim)
    per head; the P prefix tokens keep their features."""
    P = x.shape[-2] - sin.shape[-2]
    t = x[..., P:, :]
    t = (t * cos + rotate_pairs(t, half) * sin).to(x.dtype)
    return torch.cat([x[..., :P, :], t], dim=-2) if P else t


class RotaryPosEmbed(LearnedPosEmbed):
    """Rotary position embedding of queries and keys (EVA-02, DINOv3, PE, RoPE-Mixed; timm's
    variants), with an optional learned absolute table."""

    name = "rope"

    class Params(LearnedPosEmbed.Params):
        variant: Literal["axial", "dinov3", "mixed"] = "axial"
        temperature: float = Field(
            10_000.0, gt=0.0, description="frequency base (DINOv3 uses 100; mixed: of the initial ones, 10)")
        min_period: Optional[float] = Field(None, gt=0.0, description="dinov3: geometric periods from here ...")
        max_period: Optional[float] = Field(None, gt=0.0, description="... to here, instead of temperature")
        rotate_half: StrictBool = False  # pair channel i with i + head_dim/2 (true) or with its neighbour
        grid_offset: float = 0.0
        grid_indexing: Literal["ij", "xy"] = "ij"
        ref_grid: Optional[tuple[int, int]] = Field(
            None, description="axial, mixed: rescale coordinates to this grid (EVA)")
        normalize_coords: Literal["separate", "min", "max"] = "separate"  # dinov3: what a coordinate is divided by
        shift_coords: Optional[float] = Field(None, gt=0.0, description="dinov3, mixed training: random shift")
        jitter_coords: Optional[float] = Field(None, ge=1.0, description="dinov3, mixed training: per-axis scale")
        rescale_coords: Optional[float] = Field(None, ge=1.0, description="dinov3, mixed training: shared scale")
        learned: StrictBool = False  # also add a learned absolute table (``include_prefix`` as ``learned``)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.head_dim % 4:
            raise ValueError(f"needs head_dim ({ctx.head_dim}) divisible by 4: sine and cosine per axis")
        if (params.min_period is None) != (params.max_period is None):
            raise ValueError("needs both min_period and max_period, or neither")
        if params.variant != "dinov3" and params.min_period:
            raise ValueError("periods are dinov3's (set variant: dinov3)")
        if params.variant == "axial" and (params.shift_coords or params.jitter_coords or params.rescale_coords):
            raise ValueError("coordinate augmentations are dinov3's and mixed's (set variant: dinov3 or mixed)")
        if params.variant == "dinov3" and params.ref_grid is not None:
            raise ValueError("ref_grid is the axial and mixed variants' (dinov3 normalises coordinates itself)")

    def __init__(self, ctx: BuildContext, params: Params):
        if params.learned:
            super().__init__(ctx, params)
        else:  # no table: only the rotation
            PosEncoding.__init__(self, ctx, params)
            self.weight = None
            self.grid = ctx.grid_size
        self.head_dim = ctx.head_dim
        bands = self.head_dim // 4
        if params.variant == "mixed":
            # learned, timm's name and layout: (x / y, block, head, head_dim / 2)
            self.freqs = nn.Parameter(torch.empty(2, ctx.depth, ctx.num_heads, 2 * bands, **ctx.factory_kwargs))
            with torch.no_grad():
                self.freqs.copy_(_mixed_init(bands, ctx.depth, ctx.num_heads, params.temperature))
            return
        if params.variant == "axial":
            freqs = 1.0 / params.temperature ** (torch.arange(bands, dtype=torch.float32) / bands)
        else:
            if params.min_period is not None:
                e = torch.linspace(0, 1, bands, dtype=torch.float32)
                periods = params.min_period * (params.max_period / params.min_period) ** e
            else:
                periods = params.temperature ** (2.0 * torch.arange(bands, dtype=torch.float32) / (self.head_dim // 2))
            freqs = 2 * math.pi / periods
        # Not persistent: a function of the params, not a weight. float32: angles need the precision.
        self.register_buffer("freqs", freqs.to(ctx.device), persistent=False)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        return x if self.weight is None else super().forward(x, state)

    @property
    def augments(self) -> bool:
        """Whether coordinates are augmented now (training with a coordinate augmentation)."""
        p = self.params
        return self.training and bool(p.shift_coords or p.jitter_coords or p.rescale_coords)

    def coords(self, grid: tuple[int, int]) -> torch.Tensor:
        """Patch coordinates (gh * gw, 2), float32 on the frequencies' device; augmented (a new
        draw per call) while ``augments``."""
        p = self.params
        variant = "dinov3" if p.variant == "dinov3" else "axial"  # mixed: integer patch indices, as axial
        coords = _grid_coords(tuple(grid), variant, p.grid_offset, p.grid_indexing, p.ref_grid, p.normalize_coords)
        if self.augments:
            coords = _augment(coords, p.shift_coords, p.jitter_coords, p.rescale_coords)
        return coords.to(self.freqs.device)  # on meta when counting: only shapes matter

    def tables(self, grid: tuple[int, int], block_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """sin and cos (gh * gw, head_dim), float32, in the channel layout ``rotate_half`` pairs;
        for the mixed variant block ``block_index``'s, per head (heads, gh * gw, head_dim)."""
        return self._sincos(self.coords(grid), block_index)

    def _sincos(self, coords: torch.Tensor, block_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.params.variant == "mixed":
            if block_index is None:
                raise ValueError("mixed RoPE rotates with each block's own frequencies: it needs the block index")
            f = self.freqs[:, block_index].float()  # (2, heads, head_dim / 2)
            # each channel turns with both coordinates; elementwise, as timm (no matmul downcast)
            angles = coords[:, 0, None] * f[0, :, None, :] + coords[:, 1, None] * f[1, :, None, :]  # (heads, N, hd / 2)
        else:
            angles = (coords[:, :, None] * self.freqs).flatten(1)  # (N, head_dim / 2)
        sin, cos = angles.sin(), angles.cos()
        if self.params.rotate_half:
            return torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)
        pairs = lambda t: t[..., None].expand(*t.shape, 2).flatten(-2)  # noqa: E731  [f0, f0, f1, f1, ...]
        return pairs(sin), pairs(cos)

    def qk_transform(self, grid: tuple[int, int]) -> QKTransform:
        half = self.params.rotate_half
        if self.params.variant == "mixed":
            # each block's tables come from its own frequencies, made inside the block (its cost,
            # counted with it); only a training-time coordinate draw is shared by every block
            shared = self.coords(grid) if self.augments else None

            def rope_block(q: torch.Tensor, k: torch.Tensor, block_index: int | None = None):
                sin, cos = self._sincos(self.coords(grid) if shared is None else shared, block_index)
                return _apply(q, sin, cos, half), _apply(k, sin, cos, half)

            rope_block.per_block = True  # ``ForwardState.transform_qk`` hands it the block index
            return rope_block
        sin, cos = self.tables(grid)
        return lambda q, k: (_apply(q, sin, cos, half), _apply(k, sin, cos, half))

    def extra_repr(self) -> str:
        return f"{self.params.variant}, head_dim={self.head_dim}, learned={self.weight is not None}"


COMPONENTS = (RotaryPosEmbed,)
