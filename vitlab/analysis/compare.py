"""Comparing variants: sweep expansion (cartesian product of ``KEY=V1,V2`` over each recipe), one
report per variant, and rows with the change against a baseline in percent."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..errors import SpecError, VitlabError, unknown_choice
from .report import Report


@dataclass(frozen=True)
class Sweep:
    """One ``--sweep``: a dotted key and its values, each kept with the text it was written as."""

    key: str
    values: tuple[tuple[str, Any], ...]  # (raw text, parsed value)


@dataclass
class Variant:
    """A recipe plus overrides: what one row of a comparison counts."""

    recipe: str
    overrides: dict[str, Any]
    assignments: tuple[tuple[str, str], ...] = ()  # (key, raw value) from sweeps, for the name
    spec: Any = None
    name: str = ""


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``[192,192],224`` -> ``['[192,192]', '224']``."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_sweep(text: str) -> Sweep:
    """``"depth=6,12"`` -> ``Sweep("depth", (("6", 6), ("12", 12)))`` (values read as YAML)."""
    from ..recipes import parse_override

    key, sep, raw = text.partition("=")
    key = key.strip()
    example = "e.g. depth=6,12 or pos_embed.name=learned,sincos2d"
    if not sep or not key:
        raise VitlabError(f"--sweep '{text}' is not KEY=V1,V2,... ({example})")
    values = _split_values(raw)
    if not raw.strip() or any(v == "" for v in values):
        raise VitlabError(f"--sweep '{text}': empty value in the list ({example})")
    return Sweep(key, tuple((v, parse_override(f"{key}={v}")[1]) for v in values))


def expand(recipes: Sequence[str], sweeps: Sequence[Sweep] = (), overrides: Iterable[str] | dict | None = None) -> list[Variant]:
    """Every recipe times the cartesian product of the sweeps, on top of the common ``overrides``.

    Specs are loaded (validated) here, so a bad key or value fails before any counting.
    """
    from ..recipes import load_spec, parse_override

    if overrides is None:
        common: dict[str, Any] = {}
    elif isinstance(overrides, dict):
        common = dict(overrides)
    else:
        common = dict(parse_override(o) for o in overrides)
    keys = [s.key for s in sweeps]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise VitlabError(f"--sweep given twice for {', '.join(dup)}; list all values in one --sweep KEY=V1,V2")
    out = []
    for recipe in recipes:
        for combo in itertools.product(*(s.values for s in sweeps)):
            changes = {**common, **{s.key: value for s, (_, value) in zip(sweeps, combo)}}
            assignments = tuple((s.key, raw) for s, (raw, _) in zip(sweeps, combo))
            try:
                spec = load_spec(recipe, overrides=changes or None)
            except SpecError as exc:
                if assignments:
                    where = ", ".join(f"{k}={v}" for k, v in assignments)
                    raise SpecError(exc.problems, source=f"{exc.source or recipe} [{where}]") from None
                raise
            name = spec.name + (f"[{','.join(f'{k}={v}' for k, v in assignments)}]" if assignments else "")
            out.append(Variant(recipe, changes, assignments, spec, name))
    return out


def run(variants: Sequence[Variant], img_size=None, batch_size: int = 1, method: str = "auto",
        on_done: Callable[[Variant, Report], None] | None = None, *, dtype: str = "fp32",
        grad_checkpointing: bool = False, cache: Any = None) -> list[Report]:
    """One report per variant, all in this process (start-up is paid once).

    With ``method`` ``"auto"`` or ``"derived"`` every distinct piece (embedding, block on its input,
    head) is traced once for all variants (``vitlab.analysis.pieces``): the reports are derived
    counts (``method="derived"``), equal to full traces for every built-in component."""
    from . import analyze
    from .pieces import PieceCache

    if cache is None and method != "full":
        cache = PieceCache()
    reports = []
    for v in variants:
        report = analyze(v.spec, img_size=img_size, batch_size=batch_size, method=method, name=v.name, dtype=dtype,
                         grad_checkpointing=grad_checkpointing, cache=cache)
        reports.append(report)
        if on_done is not None:
            on_done(v, report)
    return reports


def merge(parts: Sequence[Sequence[dict[str, Any]]]) -> tuple[list[Report], str | None]:
    """The reports of ``compare --format json`` outputs (shards), each variant once in order of
    first appearance, and the baseline the parts were compared against."""
    seen: dict[str, Report] = {}
    baseline = None
    for rows_ in parts:
        for row in rows_:
            baseline = baseline or row.get("baseline")
            seen.setdefault(row["name"], Report.from_dict(row))
    return list(seen.values()), baseline


def _delta(value: int, base: int) -> float | None:
    return None if not base else round(100.0 * (value - base) / base, 4)


def rows(reports: Sequence[Report], baseline: str | None = None) -> list[dict[str, Any]]:
    """Each report's ``to_dict()`` plus ``baseline``, ``d_flops_%`` and ``d_params_%`` against the
    baseline (the first report, or the one named ``baseline``)."""
    if not reports:
        return []
    names = [r.name for r in reports]
    if baseline is None:
        base = reports[0]
    elif baseline in names:
        base = reports[names.index(baseline)]
    else:
        raise VitlabError(unknown_choice("baseline", baseline, dict.fromkeys(names), label="variants"))
    out = []
    for r in reports:
        d = r.to_dict()
        d["baseline"] = base.name
        d["d_flops_%"] = _delta(r.flops, base.flops)
        d["d_params_%"] = _delta(r.params, base.params)
        out.append(d)
    return out
