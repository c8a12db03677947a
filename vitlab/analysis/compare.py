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


def _common(sweeps: Sequence[Sweep], overrides: Iterable[str] | dict | None) -> dict[str, Any]:
    """The overrides every variant gets; a key swept twice is refused."""
    from ..recipes import parse_override

    keys = [s.key for s in sweeps]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise VitlabError(f"--sweep given twice for {', '.join(dup)}; list all values in one --sweep KEY=V1,V2")
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    return dict(parse_override(o) for o in overrides)


def _suffix(assignments: Sequence[tuple[str, str]]) -> str:
    return f"[{','.join(f'{k}={v}' for k, v in assignments)}]" if assignments else ""


def _variant(recipe: str, sweeps: Sequence[Sweep], combo: Sequence[tuple[str, Any]], common: dict[str, Any],
             data: dict[str, Any] | None = None) -> Variant:
    """One recipe under the common overrides and one combination of sweep values, validated;
    ``data``: the recipe's mapping when already read (a sweep reads each file once)."""
    from ..recipes import load_spec

    changes = {**common, **{s.key: value for s, (_, value) in zip(sweeps, combo)}}
    assignments = tuple((s.key, raw) for s, (raw, _) in zip(sweeps, combo))
    try:
        spec = load_spec(recipe if data is None else data, overrides=changes or None)
    except SpecError as exc:
        if assignments:
            where = ", ".join(f"{k}={v}" for k, v in assignments)
            raise SpecError(exc.problems, source=f"{exc.source or recipe} [{where}]") from None
        raise
    return Variant(recipe, changes, assignments, spec, spec.name + _suffix(assignments))


def expand(recipes: Sequence[str], sweeps: Sequence[Sweep] = (), overrides: Iterable[str] | dict | None = None) -> list[Variant]:
    """Every recipe times the cartesian product of the sweeps, on top of the common ``overrides``.

    Specs are loaded (validated) here, so a bad key or value fails before any counting.
    """
    from ..recipes import recipe_data

    common = _common(sweeps, overrides)
    read = {r: recipe_data(r)[0] for r in dict.fromkeys(recipes)} if sweeps else {}  # each file parsed once
    return [_variant(recipe, sweeps, combo, common, read.get(recipe))
            for recipe in recipes for combo in itertools.product(*(s.values for s in sweeps))]


def expand_shard(recipes: Sequence[str], sweeps: Sequence[Sweep], overrides: Iterable[str] | dict | None,
                 index: int, count: int, baseline: str | None = None) -> tuple[list[Variant], Variant]:
    """Variants ``index``, ``index + count``, ... of ``expand``'s list, and the baseline variant
    (``baseline`` by name, else the first of the whole list), validating only those: an array job
    of any size does the work of its own shard. A variant's place in the list is arithmetic (recipe,
    then the sweeps' product, the last sweep fastest); names need one load per recipe."""
    common = _common(sweeps, overrides)
    sizes = [len(s.values) for s in sweeps]
    per_recipe = 1
    for n in sizes:
        per_recipe *= n
    total = len(recipes) * per_recipe

    def at(position: int) -> tuple[str, list[tuple[str, Any]]]:
        recipe, rest = recipes[position // per_recipe], position % per_recipe
        combo = []
        for sweep, n in zip(reversed(sweeps), reversed(sizes)):  # mixed radix: the last sweep is the fastest digit
            rest, digit = divmod(rest, n)
            combo.append(sweep.values[digit])
        return recipe, combo[::-1]

    mine = [_variant(recipe, sweeps, combo, common) for recipe, combo in map(at, range(index, total, count))]
    if baseline is None:
        recipe, combo = at(0)
        return mine, _variant(recipe, sweeps, combo, common)
    if any(s.key == "name" for s in sweeps):  # names come from the sweep itself: expand them all
        found = next((v for v in expand(recipes, sweeps, common) if v.name == baseline), None)
    else:
        from ..recipes import load_spec

        base_names = {r: load_spec(r, overrides=common or None).name for r in dict.fromkeys(recipes)}
        found = None
        for p in range(total):
            recipe, combo = at(p)
            name = base_names[recipe] + _suffix([(s.key, raw) for s, (raw, _) in zip(sweeps, combo)])
            if name == baseline:
                found = _variant(recipe, sweeps, combo, common)
                break
    if found is None:
        recipe, combo = at(0)
        first = _variant(recipe, sweeps, combo, common).name
        raise VitlabError(f"unknown baseline {baseline!r}: no variant of the {total:,} has that name "
                          f"(they are named like {first!r})")
    return mine, found


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
