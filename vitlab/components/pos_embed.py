"""Position encodings. ``forward`` gets all tokens (B, P + N, D), prefix tokens first, and the
patch grid (gh, gw)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import PosEncoding
from ..context import BuildContext
from ..state import ForwardState
from ..limits import LIMITS


def resample_grid(pe: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of patch position embeddings (1, old_h * old_w, D) to a new grid, as
    timm's ``resample_abs_pos_embed``."""
    if tuple(old) == tuple(new):
        return pe
    D = pe.shape[-1]
    grid = pe.reshape(1, old[0], old[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid.float(), size=new, mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(pe.dtype)


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10_000.0, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine table (gh * gw, dim), as in big_vision's ``posemb_sincos_2d``:
    a quarter of the channels each for sin(x), cos(x), sin(y), cos(y)."""
    gh, gw = grid
    # computed where it will live: on meta (counting a huge grid) nothing is allocated
    where = {"dtype": torch.float32, "device": device}
    y, x = torch.meshgrid(torch.arange(gh, **where), torch.arange(gw, **where), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, **where) / max(quarter - 1, 1))
    x = x.flatten()[:, None] * omega[None, :]  # (N, dim/4)
    y = y.flatten()[:, None] * omega[None, :]
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (N, dim)
    return pe.to(device=device, dtype=dtype)


class LearnedPosEmbed(PosEncoding):
    """Learned absolute position embedding added to the tokens (original ViT)."""

    name = "learned"

    class Params(PosEncoding.Params):
        include_prefix: StrictBool = True  # also embed class/register tokens; false = patches only (timm no_embed_class)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.num_prefix = ctx.num_prefix_tokens if params.include_prefix else 0
        self.skip = 0 if params.include_prefix else ctx.num_prefix_tokens  # leading tokens left alone
        self.grid = ctx.grid_size
        self.weight = nn.Parameter(torch.empty(1, self.num_prefix + ctx.num_patches, ctx.embed_dim, **ctx.factory_kwargs))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def table(self, grid: tuple[int, int]) -> torch.Tensor:
        """Embeddings for the covered tokens at ``grid``: (1, covered, D)."""
        if tuple(grid) == self.grid:
            return self.weight
        prefix, patches = self.weight[:, : self.num_prefix], self.weight[:, self.num_prefix :]
        return torch.cat([prefix, resample_grid(patches, self.grid, grid)], dim=1)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        pe = self.table(state.grid)
        if self.skip:
            return torch.cat([x[:, : self.skip], x[:, self.skip :] + pe], dim=1)
        return x + pe


class SinCos2dPosEmbed(PosEncoding):
    """Fixed 2-D sine-cosine position encoding of the patches (no learned weights)."""

    name = "sincos2d"

    class Params(PosEncoding.Params):
        temperature: float = Field(10_000.0, gt=0.0)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if ctx.embed_dim % 4:
            raise ValueError(f"needs embed_dim divisible by 4 (a quarter per sin/cos axis), got {ctx.embed_dim}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.temperature = params.temperature
        self.skip = ctx.num_prefix_tokens
        self.grid = ctx.grid_size
        # Not persistent: it is a function of the sizes, not a weight to save.
        pe = sincos_2d(ctx.grid_size, ctx.embed_dim, params.temperature, device=ctx.device, dtype=ctx.dtype)
        self.register_buffer("pe", pe[None], persistent=False)  # (1, N, D)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        grid = state.grid
        pe = self.pe if tuple(grid) == self.grid else sincos_2d(grid, x.shape[-1], self.temperature, x.device, x.dtype)[None]
        if self.skip:
            return torch.cat([x[:, : self.skip], x[:, self.skip :] + pe], dim=1)
        return x + pe


class PositionGenerator(PosEncoding):
    """CPVT's position encoding generator: after one block, a depthwise convolution of the patch
    grid added to the patches (Chu et al. 2021); follows any image size."""

    name = "peg"

    class Params(PosEncoding.Params):
        at_block: int = Field(0, ge=0, le=LIMITS["depth"], description="the block after which the generator runs (CPVT: 0)")
        kernel_size: int = Field(3, gt=0, le=LIMITS["img_size"], description="odd side of the depthwise convolution")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if params.at_block >= ctx.depth:
            raise ValueError(f"runs after block {params.at_block}, which does not exist (depth {ctx.depth})")
        if params.kernel_size % 2 == 0:
            raise ValueError(f"needs an odd kernel_size (the grid keeps its size), got {params.kernel_size}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.at_block = params.at_block
        dim = ctx.embed_dim  # a staged model's generator runs in the first stage's width
        k = params.kernel_size
        self.proj = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, **ctx.factory_kwargs)

    def acts_after(self, block_index: int) -> bool:
        return block_index == self.at_block

    def after_block(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if state.block_index != self.at_block:
            return x
        gh, gw = state.require_grid(f"pos_embed '{self.name}' (after block {state.block_index})")
        P = state.num_prefix
        B, _, D = x.shape
        grid = x[:, P:].transpose(1, 2).reshape(B, D, gh, gw)  # (B, D, gh, gw)
        patches = (self.proj(grid) + grid).flatten(2).transpose(1, 2)  # (B, N, D)
        return torch.cat([x[:, :P], patches], dim=1)


class NoPosEmbed(PosEncoding):
    """No position information (a bag of patches)."""

    name = "none"


COMPONENTS = (LearnedPosEmbed, SinCos2dPosEmbed, PositionGenerator, NoPosEmbed)
