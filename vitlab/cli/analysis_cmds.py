"""``vitlab flops`` and ``vitlab compare``: FLOPs and parameter reports of recipes."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..limits import MAX_BATCH
from ..errors import VitlabError, one_line, path_label, unknown_choice
from . import cli, set_option
from .output import FORMATS


def _img_size(text: str | None):
    """``224`` or ``224x320`` (height x width)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or any(s <= 0 for s in sizes):
        raise VitlabError(f"--img-size: expected a positive integer or HxW, got {text!r}")
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def _common(f):
    f = click.option("--force", is_flag=True, help="Overwrite the files this command writes if they exist.")(f)
    f = click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Write to a file; the format follows the suffix (.json .csv .md .txt) unless --format is given.")(f)
    f = click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                     help="Output format (default: table, or the output file's suffix).")(f)
    f = click.option("--method", type=click.Choice(["auto", "full", "derived"]), default="auto", show_default=True,
                     help="full: trace the whole model (on meta tensors); derived: each distinct block once, scaled; "
                          "auto: derived in compare (pieces shared across variants), full in flops.")(f)
    f = click.option("--fit", default=None, metavar="GiB",
                     help="Also give the largest training batch predicted to fit in this much memory (16, 16GiB, 512MiB).")(f)
    f = click.option("--grad-checkpointing", is_flag=True, help="Predict memory with every block checkpointed.")(f)
    f = click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
                     help="The dtype of weights and activations in the memory prediction (and in measured runs).")(f)
    f = click.option("--batch-size", "-b", type=click.IntRange(min=1, max=MAX_BATCH), default=1, show_default=True,
                     help="Images per forward.")(f)
    f = click.option("--img-size", default=None, metavar="N|HxW", help="Input size (default: the recipe's).")(f)
    return f


@cli.command()
@click.argument("recipe")
@_common
@set_option
def flops(recipe, img_size, batch_size, dtype, grad_checkpointing, fit, method, fmt, output, force, overrides) -> None:
    """FLOPs (fvcore convention), parameters, tokens, predicted memory and a per-kind breakdown of RECIPE."""
    from ..analysis import analyze
    from ..fileio import check_writable
    from .output import emit_report, resolve_format

    fmt = resolve_format(fmt, output)
    if output is not None:
        check_writable(output, force)  # fail before any work
    budget = _fit_budget(fit)
    report = analyze(recipe, img_size=_img_size(img_size), batch_size=batch_size, method=method,
                     overrides=list(overrides) or None, dtype=dtype, grad_checkpointing=grad_checkpointing)
    if budget is not None:
        from ..recipes import load_spec

        _add_fit([report], [load_spec(recipe, overrides=list(overrides) or None)], budget, _img_size(img_size))
    emit_report(report, fmt, output, force)


def _fit_budget(fit: str | None) -> int | None:
    from ..analysis.memory import parse_gib

    if fit is None:
        return None
    budget = parse_gib(fit, "--fit")
    if budget <= 0:
        raise VitlabError(f"--fit: expected a positive size in GiB (e.g. 16 or 512MiB), got {fit!r}")
    return budget


def _add_fit(reports, specs, budget: int, size) -> None:
    """``report.fit = {budget_bytes, batch_size}``: the largest training batch predicted to fit."""
    from ..analysis.memory import human
    from ..analysis.pieces import PieceCache, largest_batch, train_peak
    from ..recipes import load_spec
    from ..spec import as_pair

    cache = PieceCache()
    short = []
    for report, spec in zip(reports, specs):
        if size is not None:
            spec = load_spec(spec, overrides={"img_size": list(as_pair(size))})
        report.fit = {"budget_bytes": budget,
                      "batch_size": largest_batch(spec, budget, report.dtype, report.grad_checkpointing, cache)}
        if report.fit["batch_size"] == 0:  # not a batch size: an error rather than a quiet 0
            one = train_peak(spec, 1, report.dtype, report.grad_checkpointing, cache)
            short.append(f"--fit {human(budget)}: not even one image of {one_line(report.name)} is predicted to fit "
                         f"(training at batch 1 is predicted to need {human(one)}); give a larger budget")
    if short:
        raise VitlabError("\n".join(short))


@cli.command()
@click.argument("recipes", nargs=-1, required=True)
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Vary a dotted key over values (depth=6,12; pos_embed.name=learned,sincos2d). "
                   "Repeatable: the cartesian product runs on top of each recipe.")
@click.option("--baseline", default=None, metavar="NAME", help="Variant the changes are against (default: the first).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw FLOPs against params and a per-kind stacked bar to this PNG (and, with --measure, "
                   "time against FLOPs and the memory breakdown to NAME.cost.png).")
@click.option("--shard", default=None, metavar="I/N",
              help="Count only variants I, I+N, I+2N, ... (0 <= I < N) of the expanded list, for array jobs; "
                   "the baseline is counted in every shard so changes stay comparable.")
@click.option("--measure", is_flag=True,
              help="Also run each variant (a fresh process each): median inference and training-step time, peak memory.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs per variant with --measure.")
@click.option("--device", default=None, help="--measure on: cpu, cuda, cuda:1 (default: cuda when present, else cpu).")
@click.option("--max-memory", default=None, metavar="SIZE",
              help=f"Memory --measure may use (default: ${'{'}VITLAB_MAX_MEMORY{'}'}, else what the machine has available).")
@click.option("--merge", is_flag=True, help="RECIPES are JSON outputs of earlier runs (shards): join them into one table.")
@_common
@set_option
def compare(recipes, sweeps, baseline, plot, shard, measure, repeats, device, max_memory, merge, img_size, batch_size,
            dtype, grad_checkpointing, fit, method, fmt, output, force, overrides) -> None:
    """Compare RECIPES (and sweeps over them): FLOPs, params, tokens, predicted memory and the change
    against a baseline; with --measure, time and peak memory of real runs."""
    from ..analysis.compare import expand, expand_shard, parse_sweep, rows, run
    from .output import resolve_format

    fmt = resolve_format(fmt, output)
    _check_outputs(output, plot, measure, force)
    if merge:
        if sweeps or shard or measure or overrides:
            raise VitlabError("--merge joins finished outputs; it takes no --sweep, --shard, --measure or --set")
        from ..analysis.report import Report
        from ..analysis.shards import join

        joined, parts_baseline = join(recipes)  # every shard checked as untrusted data first
        reports = [Report.from_dict(data) for data in joined]
        _check_outputs(output, plot, any(r.measured for r in reports), force)  # before anything is written
        names = [r.name for r in reports]
        if baseline is not None and baseline not in names:
            raise VitlabError(unknown_choice("baseline", baseline, dict.fromkeys(names), label="variants"))
        table = rows(reports, baseline or (parts_baseline if parts_baseline in names else None))
        _emit(table, reports, fmt, output, force, plot)
        return
    budget = _fit_budget(fit)
    size = _img_size(img_size)
    extra = []
    if shard is not None:  # only this shard's variants and the baseline are expanded and validated
        index, count = _parse_shard(shard)
        variants, base = expand_shard(recipes, [parse_sweep(s) for s in sweeps], list(overrides), index, count,
                                      baseline)
        baseline = base.name
        extra = [] if any(v.name == base.name for v in variants) else [base]
        variants = extra + variants  # the baseline first, only for the changes when not our own
    else:
        variants = expand(recipes, [parse_sweep(s) for s in sweeps], list(overrides))
        names = [v.name for v in variants]
        if baseline is not None and baseline not in names:  # before counting anything
            raise VitlabError(unknown_choice("baseline", baseline, dict.fromkeys(names), label="variants"))
        baseline = baseline or names[0]
    from ..analysis.pieces import PieceCache

    cache = PieceCache() if method != "full" else None  # each distinct piece counted once for all variants
    reports = _with_progress("counting", variants, lambda v: run([v], size, batch_size, method, dtype=dtype,
                                                                 grad_checkpointing=grad_checkpointing, cache=cache)[0])
    if budget is not None:
        _add_fit(reports, [v.spec for v in variants], budget, size)
    if measure:
        _measure(variants, reports, size, batch_size, dtype, device, repeats, max_memory, skip=len(extra))
    table = rows(reports, baseline)
    if shard is not None and extra:
        table, reports = table[1:], reports[1:]
    _emit(table, reports, fmt, output, force, plot)


def _check_outputs(output: Path | None, plot: Path | None, measured: bool, force: bool) -> None:
    """Every file a comparison writes, checked before any work: with measurements the plot has a
    second picture beside it, NAME.cost.png, which must not be an existing file or the output."""
    from ..fileio import check_writable

    cost = plot.with_suffix(".cost.png") if plot is not None and measured else None
    outputs = {"--output": output, "--plot": plot, "the cost plot": cost}
    for path in outputs.values():
        if path is not None:
            check_writable(path, force)
    if plot is not None and plot.suffix.lower() != ".png":
        raise VitlabError(f"--plot writes a PNG; give a .png file name, not {path_label(plot)}")
    named = [(what, path.resolve()) for what, path in outputs.items() if path is not None]
    for i, (what, path) in enumerate(named):
        for other, other_path in named[i + 1:]:
            if path == other_path:
                raise VitlabError(f"{what} and {other} name the same file ({path_label(path)})")


def _emit(table, reports, fmt, output, force, plot) -> None:
    from .output import emit_rows

    emit_rows(table, reports, fmt, output, force)
    if plot is not None:
        from ..analysis.plot import save_comparison, save_cost

        save_comparison(reports, plot, baseline=table[0]["baseline"] if table else None, force=force)
        click.echo(f"wrote {plot}", err=True)
        if any(r.measured for r in reports):
            cost = plot.with_suffix(".cost.png")
            save_cost(reports, cost, force=force)
            click.echo(f"wrote {cost}", err=True)


def _measure(variants, reports, size, batch_size, dtype, device, repeats, max_memory, skip=0) -> None:
    """``report.measured`` of each variant, each in a fresh process, refused up front when the
    predicted training peak cannot fit."""
    import torch

    from ..analysis.memory import check_fits
    from ..measure import measure_spec
    from ..recipes import load_spec
    from ..spec import as_pair

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..measure import check_device

    check_device(device)  # meta, or a device this machine lacks: one line before any work
    for v, r in zip(variants, reports):
        check_fits(r.memory["train_peak_bytes"], f"{v.name} training at batch {batch_size}",
                   max_memory=max_memory, device=device)

    def one(pair):
        v, r = pair
        spec = v.spec if size is None else load_spec(v.spec, overrides={"img_size": list(as_pair(size))})
        r.measured = measure_spec(spec, batch_size, device=device, dtype=dtype, repeats=repeats)
        for key in ("note", "warning"):  # a halved batch; timings too noisy to trust
            if key in r.measured:
                click.echo(f"warning: {one_line(v.name)}: {one_line(r.measured[key])}", err=True)
        return r

    pairs = list(zip(variants, reports))
    _with_progress("measuring", pairs[skip:], one, always=True)  # another shard's baseline is measured there


def _parse_shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise VitlabError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return index, count


def _with_progress(label: str, items, fn, always: bool = False) -> list:
    """``[fn(item) for item in items]`` with a progress bar on stderr when there are several items
    (or ``always``) and stderr is a terminal."""
    items = list(items)
    if (len(items) < 4 and not always) or not sys.stderr.isatty():
        return [fn(item) for item in items]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .output import console

    out = []
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console(stderr=True), transient=True) as progress:
        task = progress.add_task("", total=len(items))
        for item in items:
            out.append(fn(item))
            named = item[0] if isinstance(item, tuple) else item
            progress.update(task, advance=1, description=getattr(named, "name", ""))
    return out
