"""Window attention: patches attend within non-overlapping windows of the patch grid (SAM and
ViTDet's windowed blocks, Swin without the shift). Read from the forward state, the grid may be
any size: it is zero-padded to whole windows as SAM does, so ``dynamic_img_size`` works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..context import BuildContext
from ..state import ForwardState
from ..limits import LIMITS
from .attention import QKVAttention


def _partition(t: torch.Tensor, grid: tuple[int, int], w: int) -> torch.Tensor:
    """(B, h, gh * gw, hd) patches, sides multiples of ``w`` -> (B, h, windows, w * w, hd)."""
    B, H, _, C = t.shape
    gh, gw = grid
    t = t.reshape(B, H, gh // w, w, gw // w, w, C).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, H, (gh // w) * (gw // w), w * w, C)


def _unpartition(t: torch.Tensor, grid: tuple[int, int], w: int) -> torch.Tensor:
    """(B, h, windows, w * w, hd) -> (B, h, gh * gw, hd), row-major patches again."""
    B, H, _, _, C = t.shape
    gh, gw = grid
    t = t.reshape(B, H, gh // w, gw // w, w, w, C).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, H, gh * gw, C)


def window_slots(grid: tuple[int, int], padded: tuple[int, int], w: int, device=None) -> torch.Tensor:
    """The patch index (row-major on ``grid``) held by each window slot, -1 for padding:
    (windows, w * w)."""
    gh, gw = grid
    ph, pw = padded
    rows = torch.arange(ph, device=device)[:, None].expand(ph, pw)
    cols = torch.arange(pw, device=device)[None, :].expand(ph, pw)
    index = torch.where((rows < gh) & (cols < gw), rows * gw + cols, torch.full_like(rows, -1))
    return _partition(index.reshape(1, 1, ph * pw, 1), padded, w).reshape(-1, w * w)


class WindowAttention(QKVAttention):
    """Attention inside non-overlapping windows of the patch grid (padded as SAM); prefix tokens attend globally."""

    name = "window"

    class Params(QKVAttention.Params):
        window_size: int = Field(14, gt=0, le=LIMITS["img_size"], description="window side in patches; the grid is zero-padded to whole windows")
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.window = params.window_size
        self.attn_drop = params.attn_drop

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if state.grid is None:
            raise ValueError(f"window attention (block {state.block_index}) needs tokens on a patch grid; "
                             "an earlier block merged them off it")
        state.check_tokens(x, "window attention")
        B, _, D = x.shape
        P, (gh, gw), w = state.num_prefix, state.grid, self.window
        padded = (-(-gh // w) * w, -(-gw // w) * w)
        pad_h, pad_w = padded[0] - gh, padded[1] - gw
        prefix, patches = x[:, :P], x[:, P:]
        if pad_h or pad_w:  # SAM pads the normed tokens with zeros: pads enter qkv and attention
            patches = F.pad(patches.reshape(B, gh, gw, D), (0, 0, 0, pad_w, 0, pad_h)).reshape(B, -1, D)
        q, k, v = self.qkv_heads(torch.cat([prefix, patches], dim=1))  # (B, h | kv, P + padded N, hd)
        q, k = self._positions(q, k, state, padded)
        drop = self.attn_drop if self.training else 0.0
        qw, kw, vw = (_partition(t[:, :, P:], padded, w) for t in (q, k, v))  # (B, h, windows, w², hd)
        if P:  # every window also sees the prefix tokens
            nW = qw.shape[2]
            kw = torch.cat([k[:, :, None, :P].expand(-1, -1, nW, -1, -1), kw], dim=3)  # (B, h, nW, P + w², hd)
            vw = torch.cat([v[:, :, None, :P].expand(-1, -1, nW, -1, -1), vw], dim=3)
        out = _unpartition(self.attend(qw, kw, vw, dropout_p=drop), padded, w)  # (B, h, padded N, hd)
        window_map = self.attn_map
        if P:  # prefix queries attend globally, to the real tokens
            real = self._real(k, P, padded, (gh, gw)), self._real(v, P, padded, (gh, gw))
            out = torch.cat([self.attend(q[:, :, :P], *real, dropout_p=drop), out], dim=2)
        if self.record_maps:
            self.attn_map = self._full_map(window_map, self.attn_map if P else None, P, (gh, gw), padded)
        out = self.out(out)  # (B, P + padded N, D): SAM projects the padded windows too
        if pad_h or pad_w:
            grid = out[:, P:].reshape(B, padded[0], padded[1], D)[:, :gh, :gw].reshape(B, gh * gw, D)
            out = torch.cat([out[:, :P], grid], dim=1)
        return out

    @staticmethod
    def _real(t: torch.Tensor, P: int, padded: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """(B, h, P + padded N, hd) -> (B, h, P + N, hd): the pads removed."""
        if tuple(padded) == tuple(grid):
            return t
        B, H, _, C = t.shape
        patches = t[:, :, P:].reshape(B, H, padded[0], padded[1], C)[:, :, : grid[0], : grid[1]]
        return torch.cat([t[:, :, :P], patches.reshape(B, H, -1, C)], dim=2)

    def _positions(self, q, k, state: ForwardState, padded) -> tuple[torch.Tensor, torch.Tensor]:
        """The position transform on the real tokens (it knows nothing of the pads)."""
        if state.qk_transform is None:
            return q, k
        P, grid = state.num_prefix, state.grid
        if tuple(padded) == tuple(grid):
            return state.transform_qk(q, k)
        rq, rk = state.transform_qk(self._real(q, P, padded, grid), self._real(k, P, padded, grid))
        out = []
        for full, real in ((q, rq), (k, rk)):
            B, H, _, C = full.shape
            patches = full[:, :, P:].reshape(B, H, padded[0], padded[1], C).clone()
            patches[:, :, : grid[0], : grid[1]] = real[:, :, P:].reshape(B, H, grid[0], grid[1], C)
            out.append(torch.cat([real[:, :, :P], patches.reshape(B, H, -1, C)], dim=2))
        return out[0], out[1]

    def _full_map(self, window_map, prefix_map, P, grid, padded) -> torch.Tensor:
        """Window probabilities (B, h, windows, w², P + w²) and the prefix rows (B, h, P, P + N)
        -> one (B, h, P + N, P + N) map over the real tokens, zero outside each window. With
        padding, a row's mass on the pads is not shown (it sums to less than 1)."""
        B, H = window_map.shape[:2]
        T = P + grid[0] * grid[1]
        slots = window_slots(grid, padded, self.window, device=window_map.device)  # (nW, w²)
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
        return f"window_size={self.window}"


COMPONENTS = (WindowAttention,)
