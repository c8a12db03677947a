"""Derived counts: the model without its blocks traced once, each distinct block traced once, the
totals summed as ``shell + sum(blocks of a configuration x that block)``.

Exact when blocks of equal structure cost the same, which holds for every built-in (blocks differ
only in their index and stochastic-depth rate, both inert in inference); ``tests/test_flops.py``
proves derived == full on several variants. It needs real weights for one block at a time only,
so a 22 B-parameter model is counted in the memory of one block when meta tensors cannot be used.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Iterator

import torch
from torch import nn

from .count import Counts, count, materialize

_INERT = (nn.Dropout, nn.Identity)


def block_signature(block: nn.Module) -> tuple:
    """What makes two blocks cost the same: module types and settings (``extra_repr``), parameter
    and buffer shapes. Dropout / stochastic-depth rates are left out (inert in inference)."""
    parts = []
    for name, m in block.named_modules():
        if isinstance(m, _INERT) or type(m).__name__ == "DropPath":
            parts.append((name, "inert", ""))  # identity in eval: DropPath(0.1) ~ Identity ~ Dropout
        else:
            parts.append((name, type(m).__qualname__, m.extra_repr()))
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        parts.append((name, tuple(t.shape), str(t.dtype)))
    return (type(block).__qualname__, repr(getattr(block, "params", None)), tuple(parts))


def distinct_blocks(blocks: nn.ModuleList) -> list[list[int]]:
    """Indices of the blocks grouped by signature, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, block in enumerate(blocks):
        groups.setdefault(block_signature(block), []).append(i)
    return list(groups.values())


@contextlib.contextmanager
def without_blocks(model: nn.Module) -> Iterator[None]:
    """Temporarily give the model an empty ``blocks`` list (its shell: stem, norms, pool, head)."""
    blocks = model.blocks
    model.blocks = nn.ModuleList()
    try:
        yield
    finally:
        model.blocks = blocks


class _BlockRunner(nn.Module):
    """One block called as the model calls it: ``block(x, qk_transform)``. The child is named
    ``block`` so that its modules trace as ``block.*`` and rename to ``blocks.<i>.*``."""

    def __init__(self, block: nn.Module, qk_transform: Callable | None):
        super().__init__()
        self.block = block
        self.qk_transform = qk_transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.qk_transform)


def _rename(index: int) -> Callable[[str], str]:
    def rename(name: str) -> str:
        if name == "block":
            return f"blocks.{index}"
        return f"blocks.{index}.{name.removeprefix('block.')}"

    return rename


def derived_count(model: nn.Module, images: torch.Tensor, materialize_blocks: bool = False,
                  second_opinion: bool = True) -> tuple[Counts, str]:
    """Count a ``VisionTransformer`` from its shell and its distinct blocks.

    ``materialize_blocks``: the model is on meta but must run on real weights: give the shell and
    each representative block zero-filled CPU storage (one block at a time in memory).
    Returns the counts (shaped like a full trace's, per-block entries included) and a sentence
    saying how they were derived.
    """
    B, _, H, W = images.shape
    seen: dict[str, torch.Tensor] = {}

    def capture(module, args):  # what enters the blocks is what leaves them into the final norm
        seen.setdefault("x", args[0])

    with without_blocks(model):
        if materialize_blocks:
            materialize(model)
        hook = model.norm.register_forward_pre_hook(capture)
        try:
            shell = count(model, (images,), second_opinion)
        finally:
            hook.remove()
    x = seen["x"]  # (B, N, D) as the blocks see it, made where the images are
    make = torch.empty if images.device.type == "meta" else torch.zeros
    xb = make(x.shape, dtype=x.dtype, device=images.device)
    grid = model.patch_grid(H, W)
    qk = model.pos_embed.qk_transform(grid)

    total = Counts({k: Counter(v) for k, v in shell.by_module_op.items()}, Counter(shell.unsupported), shell.flop_counter)
    groups = distinct_blocks(model.blocks)
    for group in groups:
        block = model.blocks[group[0]]
        if materialize_blocks:
            materialize(block)
        one = count(_BlockRunner(block, qk), (xb,), second_opinion)
        if materialize_blocks:
            block.to("meta")  # release the block's memory before the next one
        for i in group:
            rename = _rename(i)
            for name, c in one.by_module_op.items():
                if name:  # the runner's root goes to the model's ancestors of the block instead
                    total.by_module_op.setdefault(rename(name), Counter()).update(c)
            for ancestor in ("blocks", ""):
                total.by_module_op.setdefault(ancestor, Counter()).update(one.by_module_op[""])
        total.unsupported.update({k: v * len(group) for k, v in one.unsupported.items()})
        if total.flop_counter is not None and one.flop_counter is not None:
            total.flop_counter += one.flop_counter * len(group)
    spans = ", ".join(_span(g) for g in groups)
    note = (f"derived: {len(model.blocks)} blocks in {len(groups)} distinct configuration(s) ({spans}); "
            f"one block of each traced on a ({', '.join(str(s) for s in x.shape)}) input and multiplied, "
            "the model without its blocks traced once; assumes blocks of equal structure "
            "(module types, settings, parameter shapes) cost the same")
    return total, note


def _span(group: list[int]) -> str:
    if len(group) == 1:
        return f"block {group[0]}"
    if group == list(range(group[0], group[-1] + 1)):
        return f"blocks {group[0]}-{group[-1]}"
    return f"{len(group)} blocks from {group[0]}"
