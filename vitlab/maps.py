"""Where the model attends: per-block attention maps, attention rollout, patch-grid heatmaps.

Maps come from the model's own attention components (``Attention.record_maps``), so they reflect
whatever the recipe chose (qk-norm, RoPE from a plugin, windows, ...). Recording is on only inside
``attention_maps``; the default forward stays on the fused kernel.

Each block's map has that block's own token count N: in a staged model (PiT) or after token
merging, N changes along the depth. Class attention (CaiT, XCiT) has one query, the class token:
its map is (B, heads, 1, N). ``record_attention`` also gives the grid each map lies on.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class AttentionRecord:
    """One attention layer's map and where its tokens lie.

    Attributes:
        map: (B, heads, N, N) probabilities, N counting prefix tokens ((B, heads, 1, N) for
            class attention: only the class token queries).
        grid: the patch grid of the patch tokens, ``None`` when they left the grid (merged).
        num_prefix: class and register tokens leading the N.
        block_index: the block that ran it.
        stage_index: the stage of that block.
    """

    map: torch.Tensor
    grid: tuple[int, int] | None
    num_prefix: int
    block_index: int | None
    stage_index: int


@torch.no_grad()
def record_attention(model: nn.Module, images: torch.Tensor) -> list[AttentionRecord]:
    """Every attention layer's map with the grid and prefix it was computed on, in forward order."""
    from .state import ForwardState

    states: dict[int, ForwardState] = {}

    def keep_state(module, args):
        if len(args) > 1 and isinstance(args[1], ForwardState):
            states[id(module)] = args[1]

    with recording(model) as modules:
        hooks = [m.register_forward_pre_hook(keep_state) for m in modules]
        try:
            model(images)
        finally:
            for h in hooks:
                h.remove()
        maps = [m.attn_map for m in modules]
    if any(a is None for a in maps):
        raise VitlabError("an attention component did not record its map during the forward pass")
    records = []
    for m, amap in zip(modules, maps):
        st = states.get(id(m))
        if st is None:  # called without a forward state (a pooling head's attention)
            records.append(AttentionRecord(amap, None, 0, None, 0))
        else:
            records.append(AttentionRecord(amap, st.grid, st.num_prefix, st.block_index, st.stage_index))
    return records


def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every block, each (B, heads, N, N) with that block's own N
    (class and register tokens counted; (B, heads, 1, N) for class attention). Rows sum to 1."""
    return [r.map for r in record_attention(model, images)]


def stages(maps: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``maps`` in runs of equal shape (queries, token count N): the spans rollout can compose."""
    runs: list[list[int]] = []
    for i, m in enumerate(maps):
        if runs and maps[runs[-1][-1]].shape[-2:] == m.shape[-2:]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


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
    sizes = sorted({m.shape[-1] for m in maps})
    if len(sizes) > 1:
        runs = ", ".join(f"maps {r[0]}-{r[-1]}: N={maps[r[0]].shape[-1]}" for r in stages(maps))
        raise VitlabError(f"attention rollout composes maps of one token count, got N = {sizes} ({runs}); "
                          "roll out one stage at a time (vitlab.maps.stages gives the runs)")
    odd = next((i for i, m in enumerate(maps) if m.shape[-2] != m.shape[-1]), None)
    if odd is not None:
        raise VitlabError(f"attention rollout composes square maps (every token queries), map {odd} is "
                          f"{maps[odd].shape[-2]}x{maps[odd].shape[-1]}: class attention, where only the class token "
                          "queries; roll out the self-attention blocks before it")
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


def nest_matrix(grid_in: tuple[int, int], grid_out: tuple[int, int], num_prefix: int,
                dtype=torch.float32, device=None) -> torch.Tensor | None:
    """How the tokens after a stage change draw on those before it, where the grids nest:
    (P + N_out, P + N_in), each patch token of ``grid_out`` an equal average of the ``fh x fw``
    cell of ``grid_in`` it covers (patch merging, strided pooling; a padded edge cell averages the
    tokens it has), prefix tokens carried one to one. ``None`` when the grids do not nest."""
    (h1, w1), (h2, w2) = grid_in, grid_out
    fh, fw = -(-h1 // h2), -(-w1 // w2)  # the cell: ceil, so a grid padded to whole cells still nests
    if (-(-h1 // fh), -(-w1 // fw)) != (h2, w2) or (fh, fw) == (1, 1):
        return None
    rows, cols = torch.meshgrid(torch.arange(h1, device=device), torch.arange(w1, device=device), indexing="ij")
    parent = (rows // fh * w2 + cols // fw).flatten()  # (N_in,): the output patch each input patch joins
    m = torch.zeros(num_prefix + h2 * w2, num_prefix + h1 * w1, dtype=dtype, device=device)
    m[num_prefix + parent, num_prefix + torch.arange(h1 * w1, device=device)] = 1.0
    m[torch.arange(num_prefix), torch.arange(num_prefix)] = 1.0
    return m / m.sum(dim=-1, keepdim=True)


def staged_rollout(records: list[AttentionRecord], head_fusion: Literal["mean", "max", "min"] = "mean",
                   discard_ratio: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Rollout through as many stages as nest, ending at the last token-to-token run: each run of
    one grid rolled out (``attention_rollout``), joined to the one before by ``nest_matrix`` where
    its grid nests in the previous one (Swin's patch merging: 56x56 -> 28x28 -> ...). Returns the
    (B, N_last, N_first) joint attention and the indices of the records it composed."""
    square = [run for run in stages([r.map for r in records])
              if records[run[0]].map.shape[-2] == records[run[0]].map.shape[-1]]
    if not square:
        raise VitlabError("no block attends token to token (every map has fewer queries than keys): "
                          "nothing to roll out; draw single-layer maps without --rollout")
    runs = [square[-1]]
    for run in reversed(square[:-1]):  # walk back while each earlier run is the one right before and nests
        before, after = records[run[-1]], records[runs[0][0]]
        if (run[-1] + 1 != runs[0][0] or before.grid is None or after.grid is None
                or before.num_prefix != after.num_prefix
                or nest_matrix(before.grid, after.grid, before.num_prefix) is None):
            break
        runs.insert(0, run)
    result = None
    for run in runs:
        rolled = attention_rollout([records[i].map for i in run], head_fusion, discard_ratio)  # (B, N, N)
        if result is not None:
            prev = records[run[0] - 1]
            nest = nest_matrix(prev.grid, records[run[0]].grid, prev.num_prefix, rolled.dtype, rolled.device)
            result = rolled @ (nest @ result)  # (B, N_run, N_first)
        else:
            result = rolled
    return result, [i for run in runs for i in run]


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
