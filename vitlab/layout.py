"""The per-block layout of a recipe: which blocks a ``layers`` entry names, each block's stage and
selections, and a compact description of both for ``vitlab show`` and reports.

Plain data only (no pydantic, no registry): ``ViTSpec`` builds these plans from its fields.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_at(at: Any, depth: int) -> list[int]:
    """A ``layers[i].at`` value -> sorted block indices.

    ``at`` is an int, a list of ints, or a string of indices and inclusive ranges (``"0-5,8"``).
    Raises ``ValueError`` naming the first bad part, or the first block beyond ``depth``.
    """
    if isinstance(at, bool):
        raise ValueError(f"expected a block index, a list of them or a string like '0-5,8', got {at!r}")
    if isinstance(at, int):
        indices = [at]
    elif isinstance(at, (list, tuple)):
        indices = list(at)
    elif isinstance(at, str):
        indices = []
        for part in at.split(","):
            m = _RANGE.match(part)
            if not m:
                raise ValueError(f"'{part.strip()}' in '{at}' is not an index or a range like 3-5")
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise ValueError(f"range '{part.strip()}' runs backwards")
            if hi >= depth:  # before expanding: a range can be as long as its digits allow
                raise ValueError(f"block {hi} does not exist (depth {depth})")
            indices.extend(range(lo, hi + 1))
    else:
        raise ValueError(f"expected a block index, a list of them or a string like '0-5,8', got {at!r}")
    if not indices:
        raise ValueError("names no block")
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"block indices are integers from 0, got {i!r}")
        if i >= depth:
            raise ValueError(f"block {i} does not exist (depth {depth})")
    return sorted(set(indices))


def format_indices(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (the ``at`` syntax, read back by ``parse_at``)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class StagePlan:
    """One stage: its first block (global index), depth, width, heads and the transition into it
    (``None`` for the first stage)."""

    index: int
    start: int
    depth: int
    embed_dim: int
    num_heads: int
    transition: Any  # ComponentSpec | None

    @property
    def blocks(self) -> range:
        return range(self.start, self.start + self.depth)


@dataclass
class BlockPlan:
    """One block: its stage, its selection of each block kind, its MLP ratio, and where each
    selection came from in the recipe (``("attention",)`` or ``("layers", 2, "attention")``)."""

    index: int
    stage: int
    selections: dict[str, Any]  # kind -> ComponentSpec
    mlp_ratio: float
    source: dict[str, tuple] = field(default_factory=dict)

    def mlp_hidden_dim(self, embed_dim: int) -> int:
        return int(embed_dim * self.mlp_ratio)

    def signature(self) -> tuple:
        """What makes two blocks built alike (in the same stage)."""
        sels = tuple((k, s.name, repr(sorted(s.params.items()))) for k, s in sorted(self.selections.items()))
        return self.stage, sels, self.mlp_ratio


def _selection_text(sel: Any, own: dict[str, Any]) -> str:
    """``window(window_size=7)``: the name, and the params that differ from the component's own
    defaults ``own``."""
    changed = {k: v for k, v in sel.params.items() if k not in own or own[k] != v}
    inner = ", ".join(f"{k}={v}" for k, v in changed.items())
    return f"{sel.name}({inner})" if inner else sel.name


def describe_blocks(plans: list[BlockPlan], own_defaults: Any = lambda kind, name: {}) -> list[str]:
    """One line per group of alike blocks: ``blocks 0-1,3-4: attention=window(window_size=7) ...``,
    naming per kind the selection and its params that differ from ``own_defaults(kind, name)``."""
    groups: dict[tuple, list[BlockPlan]] = {}
    for plan in plans:
        groups.setdefault(plan.signature(), []).append(plan)
    lines = []
    for members in groups.values():
        plan = members[0]
        parts = [f"{k}={_selection_text(sel, own_defaults(k, sel.name))}"
                 for k, sel in plan.selections.items()]
        parts.append(f"mlp_ratio={plan.mlp_ratio:g}")
        idx = format_indices([p.index for p in members])
        lines.append(f"{'block' if len(members) == 1 else 'blocks'} {idx} (stage {plan.stage}): {' '.join(parts)}")
    return lines
