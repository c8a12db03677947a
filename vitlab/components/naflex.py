"""NaFlex's embedding (SigLIP 2's NaFlex, timm's ``NaFlexEmbeds``): patches flattened pixel-major,
and a learned position table of its own grid, resampled to every image's patch grid.

NaFlex trains on variable resolutions and aspect ratios, so the table is not tied to one image
size: it is stored on a fixed grid (timm's ``pos_embed_grid_size``) and resampled each forward,
with the table's mode, antialiasing and corner alignment, optionally to a square of the longer
side and cropped (aspect-ratio preserving). Prefix tokens get no position.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import StrictBool
from torch import nn

from ..component import PosEncoding
from ..context import BuildContext
from ..sizes import Size2, as_pair
from ..state import ForwardState
from .patch_embed import LinearPatchEmbed


class NaFlexPatchEmbed(LinearPatchEmbed):
    """Unfold into patches flattened pixel-major, (ph, pw, C), then one Linear: NaFlex's layout,
    the order its data pipeline hands pre-patchified images in (``linear`` flattens (C, ph, pw))."""

    name = "naflex"
    PATCH_ORDER = (0, 2, 4, 3, 5, 1)  # (B, gh, gw, ph, pw, C): pixel-major


class NaFlexPosEmbed(PosEncoding):
    """A learned table on its own grid, resampled to the patch grid of every image (NaFlex);
    patches only."""

    name = "naflex"

    class Params(PosEncoding.Params):
        grid: Size2 = 16  # the stored table's (rows, cols), whatever the image size (timm pos_embed_grid_size)
        factorized: StrictBool = False  # a row table plus a column table, summed; resampled linearly
        mode: Literal["bicubic", "bilinear"] = "bicubic"  # how the 2-D table is resampled
        antialias: StrictBool = True  # 2-D table: low-pass when shrinking
        align_corners: StrictBool = False  # 2-D table
        ar_preserving: StrictBool = False  # resample to a square of the longer side, then crop

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.factorized and (params.mode, params.antialias, params.align_corners) != ("bicubic", True, False):
            raise ValueError("mode, antialias and align_corners resample the 2-D table; the factorized tables "
                             "are always resampled linearly (leave them at their defaults)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        p = params
        self.grid = as_pair(p.grid)
        self.factorized, self.ar_preserving = p.factorized, p.ar_preserving
        self.mode, self.antialias, self.align_corners = p.mode, p.antialias, p.align_corners
        self.skip = ctx.num_prefix_tokens  # leading tokens left alone
        (h, w), D, fk = self.grid, ctx.embed_dim, ctx.factory_kwargs
        if self.factorized:
            self.weight_y = nn.Parameter(torch.empty(1, h, D, **fk))  # one row per grid row
            self.weight_x = nn.Parameter(torch.empty(1, w, D, **fk))
            tables = (self.weight_y, self.weight_x)
        else:
            self.weight = nn.Parameter(torch.empty(1, h, w, D, **fk))  # timm's layout: (1, rows, cols, D)
            tables = (self.weight,)
        for t in tables:
            nn.init.normal_(t, std=0.02)

    def _size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """What the table is resampled to before cropping to ``grid``."""
        if self.ar_preserving:
            side = max(grid)
            return side, side
        return tuple(grid)

    def table(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Embeddings of the patches at ``grid``: (1, gh * gw, D) in ``dtype``, resampled in float32
        (and the factorized tables summed in ``dtype``), as timm does."""
        gh, gw = grid
        if self.factorized:
            ly, lx = self._size(grid)
            rows = self._resample_1d(self.weight_y, ly)[:, :gh].to(dtype)  # (1, gh, D)
            cols = self._resample_1d(self.weight_x, lx)[:, :gw].to(dtype)  # (1, gw, D)
            return (rows.unsqueeze(2) + cols.unsqueeze(1)).flatten(1, 2)  # (1, gh * gw, D), row-major
        h, w = self.grid
        if (gh, gw) == (h, w):
            return self.weight.reshape(1, h * w, -1).to(dtype)
        pe = F.interpolate(self.weight.permute(0, 3, 1, 2).float(), size=self._size(grid), mode=self.mode,
                           align_corners=self.align_corners, antialias=self.antialias)  # (1, D, rows, cols)
        return pe[:, :, :gh, :gw].flatten(2).transpose(1, 2).to(dtype)  # (1, gh * gw, D)

    @staticmethod
    def _resample_1d(t: torch.Tensor, length: int) -> torch.Tensor:
        """(1, L, D) -> (1, length, D), linearly."""
        if t.shape[1] == length:
            return t
        return F.interpolate(t.transpose(1, 2).float(), size=length, mode="linear",
                             align_corners=False).transpose(1, 2)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        pe = self.table(state.grid, x.dtype)
        if self.skip:
            return torch.cat([x[:, : self.skip], x[:, self.skip :] + pe], dim=1)
        return x + pe


COMPONENTS = (NaFlexPatchEmbed, NaFlexPosEmbed)
