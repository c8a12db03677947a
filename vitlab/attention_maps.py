"""Where the model attends: per-block attention maps, attention rollout, patch-grid heatmaps.

Maps come from the model's own attention components (``Attention.record_maps``), so they reflect
whatever the recipe chose (qk-norm, RoPE from a plugin, ...). Recording is on only inside
``attention_maps``; the default forward stays on the fused kernel.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from torch import nn

from .component import Attention
from .errors import VitlabError


def attention_modules(model: nn.Module) -> list[Attention]:
    """The model's attention components in forward (block) order."""
    return [m for m in model.modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[Attention]]:
    """Switch every attention component to the explicit path that keeps its probabilities."""
    modules = attention_modules(model)
    if not modules:
        raise VitlabError("the model has no vitlab attention components to record")
    without = sorted({type(m).name or type(m).__name__ for m in modules if not m.has_maps})
    if without:
        raise VitlabError(
            f"attention {', '.join(repr(n) for n in without)} computes no attention matrix "
            "(e.g. linear attention), so it has no attention maps to show"
        )
    for m in modules:
        m.record_maps, m.attn_map = True, None
    try:
        yield modules
    finally:
        for m in modules:
            m.record_maps, m.attn_map = False, None


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every block, each (B, heads, N, N), N counting class and
    register tokens. Rows sum to 1."""
    with recording(model) as modules:
        model(images)
        maps = [m.attn_map for m in modules]
    if any(a is None for a in maps):
        raise VitlabError("an attention component did not record its map during the forward pass")
    return maps


def fuse_heads(attn: torch.Tensor, head_fusion: Literal["mean", "max", "min"] = "mean") -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N)."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise VitlabError(f"unknown head_fusion '{head_fusion}'; valid: max, mean, min")


def attention_rollout(
    maps: list[torch.Tensor],
    head_fusion: Literal["mean", "max", "min"] = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each output token draws on each input
    token through all layers, with the residual stream modelled as 0.5 * identity.

    Per layer: fuse heads, zero the ``discard_ratio`` weakest links of each map (never those
    from token 0 to itself), add the identity, renormalise rows, and multiply into the running product.

    Returns:
        (B, N, N) joint attention; row i says where output token i draws from.
    """
    if not maps:
        raise VitlabError("attention_rollout needs at least one attention map")
    if not 0.0 <= discard_ratio < 1.0:
        raise VitlabError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    B, _, N, _ = maps[0].shape
    eye = torch.eye(N, dtype=maps[0].dtype, device=maps[0].device)
    result = eye.expand(B, N, N).clone()
    for attn in maps:
        a = fuse_heads(attn, head_fusion)  # (B, N, N)
        k = int(N * N * discard_ratio)
        if k:
            flat = a.reshape(B, N * N)
            weakest = flat.topk(k, dim=-1, largest=False).indices  # (B, k)
            drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, weakest, True)
            drop[:, 0] = False  # token 0's link to itself is never discarded (reference code)
            a = flat.masked_fill(drop, 0.0).reshape(B, N, N)
        a = (a + eye) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def patch_heatmap(
    attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int, class_token: bool
) -> torch.Tensor:
    """Attention on the patch grid, (B, gh, gw), normalised to [0, 1] per image.

    Args:
        attn: (B, N, N) (fused heads or rollout) or (B, heads, N, N) (heads are averaged).
        grid: patch grid (gh, gw).
        num_prefix_tokens: class + register tokens leading the sequence.
        class_token: use the class token's row; without one, the mean attention each patch
            receives over all query tokens.
    """
    if attn.ndim == 4:
        attn = attn.mean(dim=1)
    received = attn[:, 0] if class_token else attn.mean(dim=1)  # (B, N)
    patches = received[:, num_prefix_tokens:]
    gh, gw = grid
    heat = patches.reshape(-1, gh, gw)
    lo = heat.amin(dim=(1, 2), keepdim=True)
    hi = heat.amax(dim=(1, 2), keepdim=True)
    return (heat - lo) / (hi - lo).clamp_min(1e-12)
