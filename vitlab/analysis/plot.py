"""The comparison picture: FLOPs against parameters (each variant labelled) and a stacked bar of
each variant's FLOPs by component kind. matplotlib is imported on use, with the Agg backend."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from .report import KIND_KEYS, Report

# colour-blind-safe (Okabe-Ito), one per kind in KIND_KEYS order
_COLOURS = {
    "patch_embed": "#E69F00", "pos_embed": "#56B4E9", "attention": "#0072B2", "mlp": "#009E73",
    "norm": "#F0E442", "transition": "#000000", "pool": "#CC79A7", "head": "#D55E00", "other": "#999999",
}


def short_labels(names: Sequence[str]) -> list[str]:
    """Drop what every name shares: ``vit_tiny[depth=6]``, ``vit_tiny[depth=12]`` -> ``depth=6``, ``depth=12``."""
    if len(names) > 1 and all("[" in n and n.endswith("]") for n in names):
        stems = {n.split("[", 1)[0] for n in names}
        if len(stems) == 1:
            return [n.split("[", 1)[1][:-1] for n in names]
    return list(names)


def comparison_title(names: Sequence[str], baseline: str | None = None) -> str:
    """What the picture compares: ``vitlab compare: vit_tiny over depth, mlp_ratio (6 variants,
    against depth=12,mlp_ratio=4)`` for a sweep, ``vitlab compare: 3 variants against vit_tiny`` otherwise."""
    base = baseline if baseline is not None else (names[0] if names else "")
    labels = short_labels(names)
    if labels != list(names):  # one recipe swept: name it and the keys that vary
        keys = dict.fromkeys(part.split("=", 1)[0] for label in labels for part in label.split(",") if "=" in part)
        stem, base = names[0].split("[", 1)[0], labels[list(names).index(base)] if base in names else base
        return f"vitlab compare: {stem} over {', '.join(keys)} ({len(names)} variants, against {base})"
    return f"vitlab compare: {len(names)} variants against {base}"


LOG_SPAN = 20.0  # data spanning more than this factor is drawn on log axes


def _log_axes(values: Sequence[float]) -> bool:
    """Whether ``values`` span too wide a range for linear axes (ViT-Ti beside ViT-22B: a 4000x span
    squashes every small model into one blob of overlapping labels)."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) > LOG_SPAN


def _groups(xs: Sequence[float], ys: Sequence[float], tol: float = 0.015) -> list[list[int]]:
    """Indices of points that sit on top of each other (within ``tol`` of the data range, in the
    coordinates the axes use: pass logarithms for log axes)."""
    dx = (max(xs) - min(xs)) or 1.0
    dy = (max(ys) - min(ys)) or 1.0
    groups: list[list[int]] = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        for g in groups:
            j = g[0]
            if abs(xs[j] - x) <= tol * dx and abs(ys[j] - y) <= tol * dy:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def comparison_figure(reports: Sequence[Report], baseline: str | None = None):
    """A matplotlib Figure: on top GFLOPs against M params, below GFLOPs by kind per variant."""
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = len(reports)
    names = [r.name for r in reports]
    labels = short_labels(names)
    # names on the scatter when they are few and short, numbers (keyed by the bar chart) otherwise
    numbered = n > 8 or max(len(s) for s in labels) > 30
    bar_h = 0.32 * n + 1.3
    fig = plt.figure(figsize=(11, 5.0 + bar_h), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[4.6, bar_h], hspace=0.04)
    ax1, ax2 = top.subplots(), bottom.subplots()

    # top: FLOPs against params; points on top of each other share one label
    xs = [r.params / 1e6 for r in reports]
    ys = [r.flops / 1e9 for r in reports]
    ax1.scatter(xs, ys, s=48, color="#0072B2", zorder=3, edgecolor="white", linewidth=0.8)
    base = [i for i, r in enumerate(reports) if r.name == baseline][:1]
    if base and n > 1:  # drawn on top, so a variant at the same point does not hide it
        ax1.scatter([xs[base[0]]], [ys[base[0]]], s=60, color="#D55E00", zorder=5, edgecolor="white", linewidth=0.8)
    logx, logy = _log_axes(xs), _log_axes(ys)
    if logx:
        ax1.set_xscale("log")
    if logy:
        ax1.set_yscale("log")
    drawn_x = [math.log10(x) for x in xs] if logx else xs
    drawn_y = [math.log10(y) for y in ys] if logy else ys
    span_x = (max(drawn_x) - min(drawn_x)) or 1.0
    span_y = (max(drawn_y) - min(drawn_y)) or 1.0
    placed: list[tuple[float, float, int]] = []  # (x, y, vertical offset) of the labels drawn so far
    for g in sorted(_groups(drawn_x, drawn_y), key=lambda g: drawn_x[g[0]]):
        text = ", ".join(str(i + 1) if numbered else labels[i] for i in g)
        if not numbered and len(g) > 1:
            text = "\n".join(labels[i] for i in g)
        x, y = drawn_x[g[0]], drawn_y[g[0]]
        # a label starting close right of another one at about the same height would run into it:
        # step it below (then above) that one
        near = [o for px, py, o in placed if 0 <= x - px < 0.25 * span_x and abs(y - py) < 0.05 * span_y]
        offset = next(o for o in (0, -11, 11, -22, 22) if o not in near)
        placed.append((x, y, offset))
        ax1.annotate(text, (xs[g[0]], ys[g[0]]), xytext=(7, offset), textcoords="offset points", va="center",
                     fontsize=8.5, zorder=4)
    ax1.set_xlabel("parameters (M)" + (", log scale" if logx else ""))
    ax1.set_ylabel("GFLOPs (fvcore: multiply-adds)" + (", log scale" if logy else ""))
    ax1.set_title("FLOPs against parameters", fontsize=10.5)
    ax1.grid(True, alpha=0.3, zorder=0)
    ax1.margins(x=0.12 if numbered else 0.22, y=0.12)
    sizes = sorted({f"{r.img_size[0]}x{r.img_size[1]} px" for r in reports})
    batch = {r.batch_size for r in reports}
    note = ", ".join(sizes) + (f", batch {next(iter(batch))}" if len(batch) == 1 else "")
    if base and n > 1:
        note += f"\nbaseline (orange): {base[0] + 1 if numbered else labels[base[0]]}"
    ax1.text(0.01, 0.98, note, transform=ax1.transAxes, va="top", ha="left", fontsize=8, color="#555555")

    # below: stacked bars by kind, first variant on top (kinds that are zero everywhere left out)
    kinds = [k for k in KIND_KEYS if any(r.by_kind.get(k, 0) for r in reports)]
    ypos = list(range(n))[::-1]
    totals = [sum(r.by_kind.get(k, 0) for k in kinds) / 1e9 for r in reports]
    # totals too far apart for one linear axis: each bar is its variant's shares, its total printed
    shares = _log_axes(totals)
    left = [0.0] * n
    for kind in kinds:
        vals = [r.by_kind.get(kind, 0) / 1e9 for r in reports]
        if shares:
            vals = [v / t if t else 0.0 for v, t in zip(vals, totals)]
        ax2.barh(ypos, vals, left=left, color=_COLOURS[kind], label=kind, edgecolor="white", linewidth=0.5, height=0.7)
        left = [a + b for a, b in zip(left, vals)]
    ticks = [(f"{i + 1}. " if numbered else "") + lab + (" *" if r.derived else "")
             for i, (lab, r) in enumerate(zip(labels, reports))]
    ax2.set_yticks(ypos, ticks, fontsize=8.5 if n <= 24 else 7)
    for y, end, total in zip(ypos, left, totals):
        shown = f"{total:,.0f}" if total >= 1000 else f"{total:.3g}"
        ax2.text(end, y, f" {shown}" + (" GFLOPs" if shares else ""), va="center", fontsize=7.5, color="#333333")
    ax2.set_xlabel("share of each variant's FLOPs (its total at the right)" if shares else "GFLOPs")
    ax2.set_xlim(0, max(left) * (1.22 if shares else 1.12) if max(left) > 0 else 1)
    if shares:
        ax2.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax2.set_ylim(-0.6, n - 0.4)
    ax2.set_title("FLOPs by component kind", fontsize=10.5, pad=22)
    ax2.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(kinds), fontsize=8, frameon=False,
               handlelength=1.2, columnspacing=1.2)
    ax2.grid(True, axis="x", alpha=0.3)
    ax2.set_axisbelow(True)

    fig.suptitle(comparison_title(names, baseline), fontsize=12)
    if any(r.derived for r in reports):
        fig.text(0.99, 0.005, "* derived: distinct blocks counted once and scaled", ha="right", fontsize=7.5, color="#555555")
    return fig


def save_comparison(reports: Sequence[Report], path: str | os.PathLike, baseline: str | None = None,
                    force: bool = False) -> Path:
    """Write the comparison PNG atomically (refusing an existing file unless ``force``)."""
    from ..fileio import atomic_write

    fig = comparison_figure(reports, baseline)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130), force=force)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


_MEMORY_PARTS = (("params_bytes", "parameters", "#0072B2"), ("grads_bytes", "gradients", "#56B4E9"),
                 ("optimizer_bytes", "AdamW moments", "#009E73"), ("activations_bytes", "activations", "#E69F00"))


def cost_figure(reports: Sequence[Report]):
    """A matplotlib Figure: on top measured training-step time against GFLOPs, with the line of the
    median time per FLOP through the origin (variants far off it cost more or less than their
    FLOPs say); below the predicted memory of training by part, a mark at each measured peak."""
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = len(reports)
    labels = short_labels([r.name for r in reports])
    numbered = n > 8 or max(len(s) for s in labels) > 30
    bar_h = 0.32 * n + 1.3
    fig = plt.figure(figsize=(11, 5.0 + bar_h), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[4.6, bar_h], hspace=0.04)
    ax1, ax2 = top.subplots(), bottom.subplots()

    timed = [(i, r) for i, r in enumerate(reports) if r.measured and r.measured.get("train_step_ms")]
    if timed:
        xs = [r.flops / r.batch_size * r.measured["batch_size"] / 1e9 for _, r in timed]  # at the measured batch
        ys = [r.measured["train_step_ms"] for _, r in timed]
        per = sorted(y / x for x, y in zip(xs, ys) if x)[len(xs) // 2] if any(xs) else 0.0
        ax1.scatter(xs, ys, s=48, color="#0072B2", zorder=3, edgecolor="white", linewidth=0.8)
        top_x = max(xs) * 1.1
        ax1.plot([0, top_x], [0, per * top_x], color="#999999", linestyle="--", zorder=2,
                 label=f"median {per:.3g} ms per GFLOP")
        for (i, _), x, y in zip(timed, xs, ys):
            ax1.annotate(str(i + 1) if numbered else labels[i], (x, y), xytext=(7, 0), textcoords="offset points",
                         va="center", fontsize=8.5)
        ax1.legend(fontsize=8, frameon=False, loc="upper left")
        device = timed[0][1].measured["device"]
        ax1.set_title(f"measured training step (forward, backward, AdamW) on {device} against FLOPs", fontsize=10.5)
    else:
        ax1.text(0.5, 0.5, "not measured (compare --measure)", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_xlabel("GFLOPs of the forward at the measured batch")
    ax1.set_ylabel("ms per training step (median)")
    ax1.grid(True, alpha=0.3, zorder=0)

    ypos = list(range(n))[::-1]
    left = [0.0] * n
    for key, label, colour in _MEMORY_PARTS:
        vals = [r.memory.get(key, 0) / 2**20 for r in reports]
        ax2.barh(ypos, vals, left=left, color=colour, label=label, edgecolor="white", linewidth=0.5, height=0.7)
        left = [a + b for a, b in zip(left, vals)]
    peaks = [(y, r.measured["train_peak_bytes"] / 2**20) for y, r in zip(ypos, reports)
             if r.measured and r.measured.get("train_peak_bytes")]
    if peaks:
        ax2.scatter([p for _, p in peaks], [y for y, _ in peaks], marker="|", s=260, color="#D55E00", zorder=4,
                    label="measured peak")
    ax2.set_yticks(ypos, [(f"{i + 1}. " if numbered else "") + lab for i, lab in enumerate(labels)],
                   fontsize=8.5 if n <= 24 else 7)
    ax2.set_xlabel("MiB (predicted, training; + one block's backward is the rest of the predicted peak)")
    ax2.set_title("predicted training memory by part", fontsize=10.5, pad=22)
    ax2.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, fontsize=8, frameon=False)
    ax2.grid(True, axis="x", alpha=0.3)
    ax2.set_axisbelow(True)
    fig.suptitle("vitlab compare: measured cost", fontsize=12)
    return fig


def save_cost(reports: Sequence[Report], path: str | os.PathLike, force: bool = False) -> Path:
    """Write the cost PNG (time against FLOPs, memory by part) atomically."""
    from ..fileio import atomic_write

    fig = cost_figure(reports)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130), force=force)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
