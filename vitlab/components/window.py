"""Window attention: patches attend within non-overlapping windows of the patch grid (SAM and
ViTDet's windowed blocks; Swin's, shifted or not). Read from the forward state, the grid may be
any size: it is zero-padded to whole windows as SAM and Swin do, so ``dynamic_img_size`` works.

Swin (Liu et al. 2021; timm ``swin_transformer``) adds two things, both params of ``window``:

* ``shift``: the grid is rolled cyclically by ``-shift`` before it is cut into windows and rolled
  back after, and a mask (-100 on the logits, as timm) keeps a window that wraps around the edge
  from mixing patches that were not neighbours. On an axis where the grid fits in one window there
  is nothing to shift (timm sets that axis's shift to 0).
* ``rel_pos: table``: Swin v1's learned bias per head for every 2-D offset inside a window,
  ``(2 w - 1)^2`` rows (timm's ``relative_position_bias_table``).

Swin v2 (``swin_v2``) replaces the table by a small MLP over log-spaced offsets (``rel_pos: cpb``,
timm's ``swin_transformer_v2``; ``cpb_cr``, its ``swin_transformer_v2_cr``) and the scaled dot
product by a cosine with a learned per-head scale (``cosine``).
"""
from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool, model_validator
from torch import nn

from ..context import BuildContext
from ..state import ForwardState
from ..limits import LIMITS
from ..sizes import NonNegInt, as_pair
from .attention import QKVAttention
from .relpos import relative_position_index
from .swin_v2 import add_continuous_bias, add_logit_scale, continuous_bias, cosine_queries

SHIFT_MASK = -100.0  # timm's (not -inf): a masked logit, exp(-100) of the weight, never NaN


def partition(t: torch.Tensor, grid: tuple[int, int], w: int) -> torch.Tensor:
    """(B, h, gh * gw, hd) patches, sides multiples of ``w`` -> (B, h, windows, w * w, hd)."""
    B, H, _, C = t.shape
    gh, gw = grid
    t = t.reshape(B, H, gh // w, w, gw // w, w, C).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, H, (gh // w) * (gw // w), w * w, C)


def unpartition(t: torch.Tensor, grid: tuple[int, int], w: int) -> torch.Tensor:
    """(B, h, windows, w * w, hd) -> (B, h, gh * gw, hd), row-major patches again."""
    B, H, _, _, C = t.shape
    gh, gw = grid
    t = t.reshape(B, H, gh // w, gw // w, w, w, C).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, H, gh * gw, C)


def window_slots(grid: tuple[int, int], padded: tuple[int, int], w: int, device=None,
                 shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The patch index (row-major on ``grid``) held by each window slot, -1 for padding:
    (windows, w * w). With a ``shift`` the grid was rolled by ``-shift`` first: slot (r, c) holds
    patch ((r + shift_h) % gh, (c + shift_w) % gw)."""
    gh, gw = grid
    ph, pw = padded
    rows = torch.arange(ph, device=device)[:, None].expand(ph, pw)
    cols = torch.arange(pw, device=device)[None, :].expand(ph, pw)
    patch = ((rows + shift[0]) % gh) * gw + (cols + shift[1]) % gw
    index = torch.where((rows < gh) & (cols < gw), patch, torch.full_like(rows, -1))
    return partition(index.reshape(1, 1, ph * pw, 1), padded, w).reshape(-1, w * w)


def effective_shift(grid: tuple[int, int], w: int, shift: tuple[int, int]) -> tuple[int, int]:
    """No shift on an axis where the grid fits in one window (timm's ``_calc_window_shift``)."""
    return tuple(0 if g <= w else s for g, s in zip(grid, shift))


def shift_mask(padded: tuple[int, int], w: int, shift: tuple[int, int], device=None,
               dtype=None) -> torch.Tensor:
    """Swin's mask for shifted windows on the padded grid: (windows, w², w²), 0 between patches of
    one region and ``SHIFT_MASK`` across regions. Each axis is cut at ``-w`` and ``-shift`` into
    three regions (timm's ``get_attn_mask``, pads included in the last)."""
    labels = []
    for side, s in zip(padded, shift):
        index = torch.arange(side)
        # (0, -w) -> 0, (-w, -s) -> 1, (-s, end) -> 2; unshifted, timm's last slice is the whole axis
        labels.append((index >= side - w).long() + (index >= side - s).long() if s else torch.zeros(side).long())
    region = (labels[0][:, None] * 3 + labels[1][None, :]).reshape(1, 1, -1, 1)  # (1, 1, ph * pw, 1)
    region = partition(region, padded, w).reshape(-1, w * w)  # (windows, w²)
    same = region[:, :, None] == region[:, None, :]  # (windows, w², w²)
    # only operators fvcore ignores (eq, bitwise_not, masked_fill): a traced count sees no new ones
    return torch.zeros(same.shape, dtype=dtype).masked_fill(~same, SHIFT_MASK).to(device)


class WindowAttention(QKVAttention):
    """Attention inside windows of the patch grid (padded; Swin's shift, position bias and cosine optional); prefix tokens attend globally."""

    name = "window"

    class Params(QKVAttention.Params):
        window_size: int = Field(14, gt=0, le=LIMITS["img_size"], description="window side in patches; the grid is zero-padded to whole windows")
        shift: Union[NonNegInt, tuple[NonNegInt, NonNegInt]] = Field(
            0, description="Swin's cyclic shift of the grid in patches, one int or [h, w], below window_size")
        rel_pos: Literal["none", "table", "cpb", "cpb_cr"] = Field(
            "none", description="table: Swin v1's learned bias per head for every offset inside a window; cpb: "
            "Swin v2's MLP over log-spaced offsets, 16 * sigmoid; cpb_cr: Swin v2-cr's MLP over log-spaced pairs")
        cosine: StrictBool = Field(
            False, description="cosine attention with a learned per-head logit scale, clamped at ln 100 (Swin v2)")
        pretrained_window_size: NonNegInt = Field(
            0, le=LIMITS["img_size"], description="rel_pos cpb: the window its offsets are scaled by; 0 = window_size")
        cpb_hidden: int = Field(512, gt=0, le=LIMITS["embed_dim"], description="rel_pos cpb / cpb_cr: the bias MLP's "
                                "hidden width (timm: 512 for cpb, 384 for cpb_cr)")
        cpb_drop: float = Field(0.0, ge=0.0, lt=1.0,
                                description="rel_pos cpb_cr: dropout in the bias MLP (timm: 0.125)")
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

        @model_validator(mode="after")
        def _shift_inside_window(self):
            if max(as_pair(self.shift)) >= self.window_size:
                raise ValueError(f"shift {self.shift} must be below window_size {self.window_size}")
            if self.pretrained_window_size and self.rel_pos != "cpb":
                raise ValueError(f"pretrained_window_size needs rel_pos: cpb, not {self.rel_pos}")
            if self.cpb_drop and self.rel_pos != "cpb_cr":
                raise ValueError(f"cpb_drop needs rel_pos: cpb_cr, not {self.rel_pos}")
            return self

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.window = params.window_size
        self.shift = as_pair(params.shift)
        self.attn_drop = params.attn_drop
        self._masks: dict[tuple, torch.Tensor] = {}  # (padded grid, shift, device, dtype) -> shift mask
        if params.rel_pos == "table":
            w, fk = self.window, ctx.factory_kwargs
            # timm's names, so Swin checkpoints load unchanged; truncated normal as Swin initialises it
            self.relative_position_bias_table = nn.Parameter(torch.empty((2 * w - 1) ** 2, self.num_heads, **fk))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
            # Not persistent: a function of the window, not a weight to save.
            self.register_buffer("relative_position_index", relative_position_index((w, w), 0, device=ctx.device),
                                 persistent=False)
        elif params.rel_pos in ("cpb", "cpb_cr"):
            add_continuous_bias(self, params.rel_pos, self.window, ctx, params.cpb_hidden,
                                params.pretrained_window_size, params.cpb_drop)
        if params.cosine:
            add_logit_scale(self, ctx)

    def window_bias(self, padded: tuple[int, int], shift: tuple[int, int], prefix: int, like: torch.Tensor
                    ) -> torch.Tensor | None:
        """The additive bias inside each window, (1, heads | 1, windows | 1, w², P + w²), or ``None``:
        the relative position bias (v1's table, v2's MLP) plus the shift mask, 0 on the prefix keys."""
        w, bias = self.window, None
        if hasattr(self, "relative_position_bias_table"):
            n = w * w
            table = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
            bias = table.permute(2, 0, 1)[None, :, None]  # (1, heads, 1, w², w²)
        elif self.params.rel_pos in ("cpb", "cpb_cr"):
            bias = continuous_bias(self, w)[None, :, None]  # (1, heads, 1, w², w²)
        if any(shift):
            key = (padded, shift, like.device, like.dtype)
            mask = self._masks.get(key)
            if mask is None or torch.jit.is_tracing():
                # a trace (FLOP counting) sees the mask built every time, whatever ran before it:
                # full and derived counts then tally the same operators
                mask = shift_mask(padded, w, shift, like.device, like.dtype)
                if not torch.jit.is_tracing():
                    self._masks = {key: mask}
            mask = mask[None, None]  # (1, 1, windows, w², w²)
            bias = mask if bias is None else bias + mask
        if bias is not None and prefix:
            bias = F.pad(bias, (prefix, 0))
        return bias

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        gh, gw = state.require_grid(f"window attention (block {state.block_index})")
        state.check_tokens(x, "window attention")
        B, _, D = x.shape
        P, w = state.num_prefix, self.window
        shift = effective_shift((gh, gw), w, self.shift)
        padded = (-(-gh // w) * w, -(-gw // w) * w)
        pad_h, pad_w = padded[0] - gh, padded[1] - gw
        prefix, patches = x[:, :P], x[:, P:]
        if any(shift):  # Swin rolls the grid, then pads it
            patches = torch.roll(patches.reshape(B, gh, gw, D), (-shift[0], -shift[1]), (1, 2)).reshape(B, -1, D)
        if pad_h or pad_w:  # SAM and Swin pad the normed tokens with zeros: pads enter qkv and attention
            patches = F.pad(patches.reshape(B, gh, gw, D), (0, 0, 0, pad_w, 0, pad_h)).reshape(B, -1, D)
        q, k, v = self.qkv_heads(torch.cat([prefix, patches], dim=1))  # (B, h | kv, P + padded N, hd)
        q, k = self._positions(q, k, state, padded, shift)
        if self.params.cosine:
            q, k = cosine_queries(q, k, self.logit_scale)
        drop = self.attn_drop if self.training else 0.0
        qw, kw, vw = (partition(t[:, :, P:], padded, w) for t in (q, k, v))  # (B, h, windows, w², hd)
        if P:  # every window also sees the prefix tokens
            nW = qw.shape[2]
            kw = torch.cat([k[:, :, None, :P].expand(-1, -1, nW, -1, -1), kw], dim=3)  # (B, h, nW, P + w², hd)
            vw = torch.cat([v[:, :, None, :P].expand(-1, -1, nW, -1, -1), vw], dim=3)
        bias = self.window_bias(padded, shift, P, qw)
        out = unpartition(self.attend(qw, kw, vw, dropout_p=drop, bias=bias), padded, w)  # (B, h, padded N, hd)
        window_map = self.attn_map
        if P:  # prefix queries attend globally, to the real tokens
            real = self._real(k, P, padded, (gh, gw)), self._real(v, P, padded, (gh, gw))
            out = torch.cat([self.attend(q[:, :, :P], *real, dropout_p=drop), out], dim=2)
        if self.record_maps:
            self.attn_map = self._full_map(window_map, self.attn_map if P else None, P, (gh, gw), padded, shift)
        out = self.out(out)  # (B, P + padded N, D): SAM projects the padded windows too
        if pad_h or pad_w or any(shift):
            grid = out[:, P:].reshape(B, padded[0], padded[1], D)[:, :gh, :gw]  # (B, gh, gw, D)
            if any(shift):
                grid = torch.roll(grid, shift, (1, 2))
            out = torch.cat([out[:, :P], grid.reshape(B, gh * gw, D)], dim=1)
        return out

    @staticmethod
    def _real(t: torch.Tensor, P: int, padded: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """(B, h, P + padded N, hd) -> (B, h, P + N, hd): the pads removed."""
        if tuple(padded) == tuple(grid):
            return t
        B, H, _, C = t.shape
        patches = t[:, :, P:].reshape(B, H, padded[0], padded[1], C)[:, :, : grid[0], : grid[1]]
        return torch.cat([t[:, :, :P], patches.reshape(B, H, -1, C)], dim=2)

    def _positions(self, q, k, state: ForwardState, padded, shift=(0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        """The position transform on the real tokens, where they sit on the grid (it knows
        nothing of the pads or the shift)."""
        if state.qk_transform is None:
            return q, k
        P, grid = state.num_prefix, state.grid
        if tuple(padded) == tuple(grid) and not any(shift):
            return state.transform_qk(q, k)
        rq, rk = (self._rolled(self._real(t, P, padded, grid), P, grid, shift) for t in (q, k))
        rq, rk = (self._rolled(t, P, grid, tuple(-s for s in shift)) for t in state.transform_qk(rq, rk))
        out = []
        for full, real in ((q, rq), (k, rk)):
            B, H, _, C = full.shape
            patches = full[:, :, P:].reshape(B, H, padded[0], padded[1], C).clone()
            patches[:, :, : grid[0], : grid[1]] = real[:, :, P:].reshape(B, H, grid[0], grid[1], C)
            out.append(torch.cat([real[:, :, :P], patches.reshape(B, H, -1, C)], dim=2))
        return out[0], out[1]

    @staticmethod
    def _rolled(t: torch.Tensor, P: int, grid: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
        """(B, h, P + N, hd) with the patches rolled by ``shift`` on the grid (undoing a roll by -shift)."""
        if not any(shift):
            return t
        B, H, _, C = t.shape
        patches = torch.roll(t[:, :, P:].reshape(B, H, grid[0], grid[1], C), shift, (2, 3))
        return torch.cat([t[:, :, :P], patches.reshape(B, H, -1, C)], dim=2)

    def _full_map(self, window_map, prefix_map, P, grid, padded, shift=(0, 0)) -> torch.Tensor:
        """Window probabilities (B, h, windows, w², P + w²) and the prefix rows (B, h, P, P + N)
        -> one (B, h, P + N, P + N) map over the real tokens, zero outside each window. With
        padding, a row's mass on the pads is not shown (it sums to less than 1)."""
        B, H = window_map.shape[:2]
        T = P + grid[0] * grid[1]
        slots = window_slots(grid, padded, self.window, device=window_map.device, shift=shift)  # (nW, w²)
        token = torch.where(slots >= 0, slots + P, torch.full_like(slots, T))  # T: a column for the pads
        keys = torch.cat([torch.arange(P, device=slots.device)[None].expand(slots.shape[0], P), token], dim=1)
        full = window_map.new_zeros(B, H, T + 1, T + 1)
        rows = token[:, :, None].expand(-1, -1, keys.shape[1])  # (nW, w², P + w²)
        cols = keys[:, None, :].expand_as(rows)
        full[:, :, rows, cols] = window_map
        full = full[:, :, :T, :T]
        if prefix_map is not None:
            full[:, :, :P] = prefix_map
        return full

    def extra_repr(self) -> str:
        return f"window_size={self.window}" + (f", shift={self.shift}" if any(self.shift) else "")


COMPONENTS = (WindowAttention,)
