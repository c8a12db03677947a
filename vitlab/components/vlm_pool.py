"""Pooling heads of vision-language towers: what turns a VLM encoder's patch tokens into the tokens
its language model reads, or into one feature vector for a classifier.

* ``avg_std``: the mean over the patch tokens, then a norm without learned weights (timm's
  classifier wrappers of Qwen3-VL, Gemma 4 and DeepSeek: ``LayerNorm`` / ``RmsNorm`` with
  ``affine=False``);
* ``unshuffle_mlp``: each k x k cell of patch tokens concatenated into one token (a pixel
  unshuffle), then fc1 -> act -> fc2 to the language model's width (Qwen3-VL's merger, DeepSeek's
  aligner); ``unshuffle_mlp_avg`` averages those tokens and norms them for a classifier;
* ``cell_avg``: the mean of each k x k cell of patches as one token, times sqrt(D), optionally
  standardised by two buffers (Gemma 4's soft tokens).

All of them leave prefix tokens (class, registers) out, as ``avg`` does. The cell pools regroup the
patch tokens on the build-time grid: ``Pool.forward`` receives no forward state that could tell it
another grid, so they refuse ``dynamic_img_size``.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool
from torch import nn

from ..component import Pool
from ..context import BuildContext
from ..layers import ACTIVATIONS, Linear
from ..limits import LIMITS
from .mlp import Activation

PlainNorm = Literal["layernorm", "rmsnorm"]


def plain_norm(x: torch.Tensor, kind: PlainNorm, eps: float) -> torch.Tensor:
    """A norm over the last dimension without learned weights (timm's ``affine=False`` norms)."""
    shape = (x.shape[-1],)
    return F.layer_norm(x, shape, eps=eps) if kind == "layernorm" else F.rms_norm(x, shape, eps=eps)


class AvgStdPool(Pool):
    """Mean over the patch tokens, then a norm without learned weights (timm's VLM classifiers)."""

    name = "avg_std"

    class Params(Pool.Params):
        norm: PlainNorm = "layernorm"
        eps: float = Field(1e-6, gt=0.0)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.skip = ctx.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_norm(x[:, self.skip:].mean(dim=1), self.params.norm, self.params.eps)  # (B, D)


class _CellPool(Pool):
    """A pool over k x k cells of the patch grid it was built for (``merge_size`` or ``kernel``)."""

    keeps_tokens = True  # tokens out, one per cell: (B, cells, width)

    @classmethod
    def cell(cls, params) -> int:
        raise NotImplementedError

    @classmethod
    def check(cls, ctx: BuildContext, params) -> None:
        if ctx.dynamic_img_size:
            raise ValueError("groups the patches of the build-time grid (a pool is given no forward state to tell "
                             "it another one): needs dynamic_img_size false")

    def __init__(self, ctx: BuildContext, params):
        super().__init__(ctx, params)
        self.skip = ctx.num_prefix_tokens
        self.grid = tuple(ctx.grid_size)
        k = self.cell(params)
        self.cells = tuple(math.ceil(g / k) for g in self.grid)  # cells per side; a partial cell is zero-padded

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P + gh * gw, D) -> the patch grid (B, gh, gw, D)."""
        x = x[:, self.skip:]
        return x.reshape(x.shape[0], *self.grid, x.shape[-1])


class UnshuffleMlpPool(_CellPool):
    """Each k x k cell of patch tokens concatenated into one, then fc1 -> act -> fc2 (Qwen3-VL's
    merger, DeepSeek's aligner); tokens (B, ceil(gh / k) * ceil(gw / k), width)."""

    name = "unshuffle_mlp"

    class Params(Pool.Params):
        merge_size: int = Field(2, gt=0, le=LIMITS["img_size"], description="k: cells of k x k patches become one token")
        order: Literal["hwc", "chw"] = "hwc"  # a cell's channels: (row, col, D) as Qwen, (D, row, col) as DeepSeek
        norm: StrictBool = False  # the recipe's norm on each patch token before merging (Qwen's merger)
        hidden: Optional[int] = Field(None, gt=0, le=LIMITS["embed_dim"], description="fc1 width; null = k * k * embed_dim")
        out_features: Optional[int] = Field(None, gt=0, le=LIMITS["embed_dim"], description="fc2 width; null = no fc2 (fc1's output)")
        act: Activation = "gelu"

    @classmethod
    def cell(cls, params: Params) -> int:
        return params.merge_size

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, k, fk = ctx.embed_dim, params.merge_size, ctx.factory_kwargs
        merged = k * k * D
        hidden = params.hidden or merged
        self.norm = ctx.make("norm") if params.norm else nn.Identity()
        self.fc1 = Linear(merged, hidden, **fk)
        self.act = ACTIVATIONS[params.act]()
        self.fc2 = Linear(hidden, params.out_features, **fk) if params.out_features else nn.Identity()
        self.width = params.out_features or hidden

    def make_head(self, ctx: BuildContext, num_classes: int) -> nn.Module:
        return Linear(self.width, num_classes, **ctx.factory_kwargs) if num_classes else nn.Identity()

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P + gh * gw, D) -> (B, h * w, k * k * D), cells row-major, zero-padded at the bottom / right."""
        g = self.patches(self.norm(x))  # (B, gh, gw, D)
        B, gh, gw, D = g.shape
        k = self.params.merge_size
        (h, w) = self.cells
        if h * k != gh or w * k != gw:
            g = F.pad(g, (0, 0, 0, w * k - gw, 0, h * k - gh))
        g = g.reshape(B, h, k, w, k, D)
        g = g.permute(0, 1, 3, 2, 4, 5) if self.params.order == "hwc" else g.permute(0, 1, 3, 5, 2, 4)
        return g.reshape(B, h * w, k * k * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.merge(x))))  # (B, cells, width)


class UnshuffleMlpAvgPool(UnshuffleMlpPool):
    """``unshuffle_mlp``, then the mean over its tokens and a norm without learned weights (timm's
    Qwen3-VL ``_merge`` and DeepSeek ``_align`` classifiers)."""

    name = "unshuffle_mlp_avg"
    keeps_tokens = False

    class Params(UnshuffleMlpPool.Params):
        out_norm: Optional[PlainNorm] = "layernorm"  # after the mean, without learned weights; null = none
        out_eps: float = Field(1e-6, gt=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x).mean(dim=1)  # (B, width)
        p = self.params
        return x if p.out_norm is None else plain_norm(x, p.out_norm, p.out_eps)


class CellAvgPool(_CellPool):
    """The mean of each k x k cell of patches as one token, times sqrt(D), optionally standardised
    by ``(x - std_bias) * std_scale`` (Gemma 4's soft tokens); tokens (B, gh / k * gw / k, D)."""

    name = "cell_avg"

    class Params(Pool.Params):
        kernel: int = Field(2, gt=0, le=LIMITS["img_size"], description="k: cells of k x k patches become one token (Gemma 4: 3)")
        standardize: StrictBool = False  # the std_bias / std_scale buffers after pooling (Gemma 4 31B)

    @classmethod
    def cell(cls, params: Params) -> int:
        return params.kernel

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        super().check(ctx, params)
        gh, gw = ctx.grid_size
        if gh % params.kernel or gw % params.kernel:
            raise ValueError(f"needs a patch grid divisible by kernel {params.kernel}, got {gh}x{gw}")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, k = ctx.embed_dim, params.kernel
        self.scale = D ** 0.5
        gh, gw = self.grid
        # (cells, gh * gw): row c averages the patches of cell c. Kept as a product, as timm and HF
        # compute it, so that counted FLOPs follow theirs; not persistent: a function of the grid.
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        cell_of = (rows // k * (gw // k) + cols // k).flatten()  # (gh * gw,)
        avg = (cell_of[None, :] == torch.arange(self.cells[0] * self.cells[1])[:, None]).float() / (k * k)
        self.register_buffer("cell_avg", avg.to(ctx.device), persistent=False)
        if params.standardize:
            self.register_buffer("std_bias", torch.zeros(D, **ctx.factory_kwargs))
            self.register_buffer("std_scale", torch.ones(D, **ctx.factory_kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, self.skip:]  # (B, N, D)
        B = patches.shape[0]
        y = (self.cell_avg.float().expand(B, -1, -1) @ patches.float()).to(x.dtype) * self.scale  # (B, cells, D)
        if self.params.standardize:
            y = (y - self.std_bias) * self.std_scale
        return y


COMPONENTS = (AvgStdPool, UnshuffleMlpPool, UnshuffleMlpAvgPool, CellAvgPool)
