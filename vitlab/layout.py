"""The per-block layout of a recipe: which blocks a ``layers`` entry names, each block's stage and
selections, and a compact description of both for ``vitlab show`` and reports.

Plain data only (no pydantic, no registry): ``ViTSpec`` builds these plans from its fields.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# ASCII digits only: "\d" would take "１" (fullwidth one) or "١" (Arabic-Indic one) as block 1
_RANGE = re.compile(r"^[ \t]*([0-9]+)[ \t]*(?:-[ \t]*([0-9]+)[ \t]*(?::[ \t]*([0-9]+)[ \t]*)?)?$")
_BAD_AT = "expected a block index, a list of them or a string like '0-5,8' or '1-11:2'"


def parse_at(at: Any, depth: int) -> list[int]:
    """A ``layers[i].at`` value -> sorted block indices (``at_spans`` expanded)."""
    return [i for lo, hi in at_spans(at, depth) for i in range(lo, hi + 1)]


def at_spans(at: Any, depth: int) -> list[tuple[int, int]]:
    """A ``layers[i].at`` value -> the sorted, disjoint, inclusive runs of blocks it names.

    ``at`` is an int, a list of ints, or a string of indices and inclusive ranges (``"0-5,8"``),
    a range optionally with a step (``"1-11:2"``: 1, 3, ..., 11, Swin's shifted blocks).
    Ranges are kept as intervals and merged before any index is listed (stepped ones per step and
    residue), so the work and memory are bounded by ``depth`` times the square root of the length
    of ``at``, however many and however long the ranges are.
    Raises ``ValueError`` naming the first bad part, or the first block beyond ``depth``.
    """
    if isinstance(at, bool):
        raise ValueError(f"{_BAD_AT}, got {at!r}")
    stepped: list[tuple[int, int, int]] = []  # (first, last, step), last on the step
    if isinstance(at, int):
        spans = [(at, at)]
    elif isinstance(at, (list, tuple)):
        for i in at:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ValueError(f"block indices are integers from 0, got {i!r}")
        spans = [(i, i) for i in at]
    elif isinstance(at, str):
        spans, stepped = [], []
        for part in at.split(","):
            m = _RANGE.match(part)
            if not m:
                raise ValueError(f"'{part.strip()[:40]}' in '{at[:80]}' is not an index or a range like 3-5 or 1-11:2")
            digits = max(m.group(1), m.group(2) or "", key=len)
            if len(digits.lstrip("0")) > len(str(depth)):  # before int(), which is slow (or refuses) for 10⁵⁰⁰⁰
                shown = digits if len(digits) <= 40 else f"{digits[:12]}... ({len(digits)} digits)"
                raise ValueError(f"block {shown} does not exist (depth {depth})")
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise ValueError(f"range '{part.strip()}' runs backwards")
            step = m.group(3)
            if step is not None:
                if not step.strip("0"):
                    raise ValueError(f"range '{part.strip()}' has step 0")
                if len(step.lstrip("0")) <= len(str(depth)) and int(step) < hi - lo:  # else: lo alone
                    stepped.append((lo, hi - (hi - lo) % int(step), int(step)))
                    continue
                hi = lo
            spans.append((lo, hi))
    else:
        raise ValueError(f"{_BAD_AT}, got {type(at).__name__}")
    if not spans and not stepped:
        raise ValueError("names no block")
    for lo, hi in spans + [(lo, hi) for lo, hi, _ in stepped]:
        if lo < 0:
            raise ValueError(f"block indices are integers from 0, got {lo!r}")
        if hi >= depth:
            raise ValueError(f"block {hi} does not exist (depth {depth})")
    # merged spans are disjoint inside [0, depth): at most depth of them, whatever at says
    if not stepped:
        return _merged(spans)
    # stepped ranges merge per (step, residue), in units of the step: a step s costs at most
    # min(ranges, s) * depth / s, whatever at says
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for lo, hi, step in stepped:
        groups.setdefault((step, lo % step), []).append((lo // step, hi // step))
    singles = [(b, b) for (step, residue), units in groups.items()
               for lo, hi in _merged(units) for b in (u * step + residue for u in range(lo, hi + 1))]
    return _merged(spans + singles)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive intervals, sorted and merged where they overlap or touch."""
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def apply_layers(plans: list["BlockPlan"], entries: list[tuple[Any, dict[str, Any]]], depth: int) -> None:
    """Apply ``layers`` entries, ``(at, {field: value})`` in recipe order (a field a block kind or
    ``mlp_ratio``), to the blocks' ``plans``: later entries win, and each selection remembers the
    entry it came from. Entries are walked last to first, each field of a block set once; ``free[f]``
    points past the blocks already set (union-find with path halving), so an entry naming every
    block costs its runs, not the depth: linear in entries plus depth, however they overlap."""
    fields = {f for _, values in entries for f in values}
    free = {f: list(range(depth + 1)) for f in fields}

    def first_free(f: str, i: int) -> int:
        up = free[f]
        while up[i] != i:
            up[i] = up[up[i]]
            i = up[i]
        return i

    for j in reversed(range(len(entries))):
        at, values = entries[j]
        for lo, hi in at_spans(at, depth) if values else ():
            for f, value in values.items():
                i = first_free(f, lo)
                while i <= hi:
                    if f == "mlp_ratio":
                        plans[i].mlp_ratio = value
                    else:
                        plans[i].selections[f], plans[i].source[f] = value, ("layers", j, f)
                    free[f][i] = i + 1
                    i = first_free(f, i + 1)


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
