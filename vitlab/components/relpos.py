"""Learned relative position biases added inside attention, in two forms:

* a table (``mhsa_relpos``): BEiT's per-block bias (timm ``beit.Attention`` with
  ``use_rel_pos_bias``) and timm's ``RelPosBias``. One bias per head for every 2-D offset between
  two patches, ``(2 gh - 1) (2 gw - 1)`` rows, plus, with a class token, three rows for
  class -> patch, patch -> class and class -> class. The table is tied to the build-time grid:
  another image size is refused (``dynamic_img_size: false``) rather than silently resampled.
* a small MLP over log-spaced offsets (timm's ``RelPosMlp`` in its default ``cr`` mode, the
  ``vision_transformer_relpos`` family): per block (``mhsa_relpos_mlp``) or one shared by every
  block (the position encoding ``relpos_mlp``). It follows any grid; prefix tokens get no bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..component import PosEncoding
from ..context import BuildContext
from ..layers import Linear
from ..state import ForwardState
from ..limits import LIMITS
from .attention import MultiHeadSelfAttention


def relative_position_index(grid: tuple[int, int], num_prefix: int, device=None) -> torch.Tensor:
    """Rows of the bias table for every (query, key) pair: (P + N, P + N) long, P <= 1.

    Patch pairs index their offset ``(dy + gh - 1) * (2 gw - 1) + (dx + gw - 1)``; with a prefix
    token the three rows after the offsets are prefix -> patch, patch -> prefix, prefix -> prefix
    (timm's ``gen_relative_position_index`` with ``class_token=True``).
    """
    gh, gw = grid
    y, x = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    coords = torch.stack([y.flatten(), x.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N), query minus key
    index = (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)  # (N, N)
    if not num_prefix:
        return index
    offsets = (2 * gh - 1) * (2 * gw - 1)
    out = torch.full((gh * gw + 1, gh * gw + 1), offsets, dtype=index.dtype, device=device)  # prefix -> patch
    out[1:, 0] = offsets + 1  # patch -> prefix
    out[0, 0] = offsets + 2  # prefix -> prefix
    out[1:, 1:] = index
    return out


def log_coords(grid: tuple[int, int], device=None) -> torch.Tensor:
    """Every 2-D offset between two patches, log-spaced: (2 gh - 1, 2 gw - 1, 2) float32,
    ``sign(d) * log(1 + |d|)`` (timm's ``gen_relative_log_coords`` in ``cr`` mode)."""
    gh, gw = grid
    dy = torch.arange(-(gh - 1), gh, device=device, dtype=torch.float32)
    dx = torch.arange(-(gw - 1), gw, device=device, dtype=torch.float32)
    coords = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)  # (2 gh - 1, 2 gw - 1, 2)
    return torch.sign(coords) * torch.log1p(coords.abs())


def table_rows(grid: tuple[int, int], num_prefix: int) -> int:
    """Rows of the bias table for ``grid`` (three more with a prefix token)."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + (3 if num_prefix else 0)


def plus_shared_bias(own: torch.Tensor, state: ForwardState) -> torch.Tensor:
    """A layer's own bias plus the position encoding's shared one, when there is one."""
    return own if state.attn_bias is None else own + state.attn_bias


class RelPosAttention(MultiHeadSelfAttention):
    """Multi-head self-attention plus a learned relative position bias of its own (BEiT)."""

    name = "mhsa_relpos"

    @classmethod
    def check(cls, ctx: BuildContext, params: MultiHeadSelfAttention.Params) -> None:
        super().check(ctx, params)
        if ctx.num_prefix_tokens > 1:
            raise ValueError(f"the relative position table has rows for one prefix token (the class token) at most, "
                             f"got {ctx.num_prefix_tokens} prefix tokens (class and register tokens)")
        if ctx.dynamic_img_size:
            raise ValueError("the relative position table is tied to the patch grid: set dynamic_img_size: false")

    def __init__(self, ctx: BuildContext, params: MultiHeadSelfAttention.Params):
        super().__init__(ctx, params)
        self.grid = tuple(ctx.grid_size)
        rows = table_rows(self.grid, self.num_prefix)
        # timm's name, so checkpoints load under it unchanged; zero: no bias until trained (as BEiT)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, self.num_heads, **ctx.factory_kwargs))
        # Not persistent: a function of the grid, not a weight to save.
        index = relative_position_index(self.grid, self.num_prefix, device=ctx.device)
        self.register_buffer("relative_position_index", index, persistent=False)

    def bias(self, state: ForwardState) -> torch.Tensor:
        """This block's table at ``state``'s grid, (1, heads, P + N, P + N), plus the state's shared bias."""
        grid = state.require_grid(f"attention '{self.name}' (block {state.block_index}, a relative position table)")
        if tuple(grid) != self.grid or state.num_prefix != self.num_prefix:
            got = f"grid {grid[0]}x{grid[1]}"
            raise ValueError(f"attention '{self.name}' has a relative position table for the "
                             f"{self.grid[0]}x{self.grid[1]} patch grid with {self.num_prefix} prefix token(s), "
                             f"got {got} with {state.num_prefix}: build the model at this image size")
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)  # (N, N, heads)
        return plus_shared_bias(bias.permute(2, 0, 1).unsqueeze(0), state)  # (1, heads, N, N)


class LogCoordBias(nn.Module):
    """The bias MLP (timm's ``RelPosMlp``, ``cr`` mode): log-spaced offsets (2) -> ``hidden`` ->
    ReLU -> one bias per head, looked up for every pair of patches."""

    def __init__(self, ctx: BuildContext, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.grid = tuple(ctx.grid_size)
        self.mlp = nn.Module()  # timm's names: ``mlp.fc1``, ``mlp.fc2``
        self.mlp.fc1 = Linear(2, hidden, **ctx.factory_kwargs)
        self.mlp.fc2 = Linear(hidden, heads, **ctx.factory_kwargs)
        self.drop = nn.Dropout(0.125)  # timm's RelPosMlp drops the hidden units in training
        # Not persistent: functions of the build-time grid, not weights to save.
        self.register_buffer("rel_coords_log", log_coords(self.grid, ctx.device), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(self.grid, 0, ctx.device),
                             persistent=False)

    def forward(self, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        """The bias at ``grid``: (1, heads, P + N, P + N), zero on rows and columns of prefix tokens."""
        if tuple(grid) == self.grid:
            coords, index = self.rel_coords_log, self.relative_position_index
        else:
            device = self.rel_coords_log.device
            coords, index = log_coords(grid, device), relative_position_index(grid, 0, device)
        n = index.shape[0]
        table = self.mlp.fc2(self.drop(F.relu(self.mlp.fc1(coords.to(self.mlp.fc1.weight.dtype)))))
        bias = table.reshape(-1, self.heads)[index.view(-1)].view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)
        if num_prefix:
            bias = F.pad(bias, [num_prefix, 0, num_prefix, 0])  # (heads, P + N, P + N)
        return bias.unsqueeze(0)


class RelPosMlpAttention(MultiHeadSelfAttention):
    """Multi-head self-attention plus a relative position bias from its own small MLP (timm relpos)."""

    name = "mhsa_relpos_mlp"

    class Params(MultiHeadSelfAttention.Params):
        bias_hidden: int = Field(128, gt=0, le=LIMITS["embed_dim"], description="hidden width of the MLP computing the bias (timm rel_pos_dim)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.rel_pos = LogCoordBias(ctx, self.num_heads, params.bias_hidden)

    def bias(self, state: ForwardState) -> torch.Tensor:
        """This block's MLP bias at ``state``'s grid plus the state's shared bias."""
        state.require_grid(f"attention '{self.name}' (block {state.block_index}, a relative position bias)")
        return plus_shared_bias(self.rel_pos(state.grid, state.num_prefix), state)


class SharedRelPosMlp(PosEncoding):
    """A relative position bias from one small MLP, shared by every attention (timm ``shared_rel_pos``)."""

    name = "relpos_mlp"

    class Params(PosEncoding.Params):
        hidden: int = Field(128, gt=0, le=LIMITS["embed_dim"], description="hidden width of the MLP computing the bias (timm rel_pos_dim)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.rel_pos = LogCoordBias(ctx, ctx.num_heads, params.hidden)

    def attn_bias(self, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        return self.rel_pos(grid, num_prefix)


COMPONENTS = (RelPosAttention, RelPosMlpAttention, SharedRelPosMlp)
