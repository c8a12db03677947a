"""``vitlab flops`` and ``vitlab compare``: FLOPs and parameter reports of recipes."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import VitlabError, unknown_choice
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
    f = click.option("--force", is_flag=True, help="Overwrite OUTPUT (and the plot) if it exists.")(f)
    f = click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Write to a file; the format follows the suffix (.json .csv .md .txt) unless --format is given.")(f)
    f = click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                     help="Output format (default: table, or the output file's suffix).")(f)
    f = click.option("--method", type=click.Choice(["auto", "full", "derived"]), default="auto", show_default=True,
                     help="full: trace the whole model; derived: each distinct block once, scaled; auto: full on meta tensors.")(f)
    f = click.option("--batch-size", "-b", type=click.IntRange(min=1), default=1, show_default=True, help="Images per forward.")(f)
    f = click.option("--img-size", default=None, metavar="N|HxW", help="Input size (default: the recipe's).")(f)
    return f


@cli.command()
@click.argument("recipe")
@_common
@set_option
def flops(recipe, img_size, batch_size, method, fmt, output, force, overrides) -> None:
    """FLOPs (fvcore convention), parameters, tokens and a per-kind breakdown of RECIPE."""
    from ..analysis import analyze
    from ..fileio import check_writable
    from .output import emit_report, resolve_format

    fmt = resolve_format(fmt, output)
    if output is not None:
        check_writable(output, force)  # fail before any work
    report = analyze(recipe, img_size=_img_size(img_size), batch_size=batch_size, method=method,
                     overrides=list(overrides) or None)
    emit_report(report, fmt, output, force)


@cli.command()
@click.argument("recipes", nargs=-1, required=True)
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Vary a dotted key over values (depth=6,12; pos_embed.name=learned,sincos2d). "
                   "Repeatable: the cartesian product runs on top of each recipe.")
@click.option("--baseline", default=None, metavar="NAME", help="Variant the changes are against (default: the first).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw FLOPs against params and a per-kind stacked bar to this PNG.")
@click.option("--shard", default=None, metavar="I/N",
              help="Count only variants I, I+N, I+2N, ... (0 <= I < N) of the expanded list, for array jobs; "
                   "the baseline is counted in every shard so changes stay comparable.")
@_common
@set_option
def compare(recipes, sweeps, baseline, plot, shard, img_size, batch_size, method, fmt, output, force, overrides) -> None:
    """Compare RECIPES (and sweeps over them): FLOPs, params, tokens and the change against a baseline."""
    from ..analysis.compare import expand, parse_sweep, rows, run
    from ..fileio import check_writable
    from .output import emit_rows, resolve_format

    fmt = resolve_format(fmt, output)
    for path in (output, plot):
        if path is not None:
            check_writable(path, force)
    if plot is not None and plot.suffix.lower() != ".png":
        raise VitlabError(f"--plot writes a PNG; give a .png file name, not {plot.name}")
    if output is not None and plot is not None and output.resolve() == plot.resolve():
        raise VitlabError("--output and --plot name the same file")
    variants = expand(recipes, [parse_sweep(s) for s in sweeps], list(overrides))
    size = _img_size(img_size)
    names = [v.name for v in variants]
    if baseline is not None and baseline not in names:  # before counting anything
        raise VitlabError(unknown_choice("baseline", baseline, dict.fromkeys(names), label="variants"))
    baseline = baseline or names[0]
    if shard is not None:
        index, count = _parse_shard(shard)
        mine = variants[index::count]
        extra = [v for v in variants if v.name == baseline and v not in mine][:1]
        variants = extra + mine  # the baseline first, only for the changes when not our own
    reports = _run_with_progress(variants, size, batch_size, method, run)
    table = rows(reports, baseline)
    if shard is not None and extra:
        table, reports = table[1:], reports[1:]
    emit_rows(table, reports, fmt, output, force)
    if plot is not None:
        from ..analysis.plot import save_comparison

        save_comparison(reports, plot, baseline=table[0]["baseline"], force=force)
        click.echo(f"wrote {plot}", err=True)


def _parse_shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise VitlabError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return index, count


def _run_with_progress(variants, size, batch_size, method, run):
    """A progress bar on stderr when there are several variants and stderr is a terminal."""
    if len(variants) < 4 or not sys.stderr.isatty():
        return run(variants, size, batch_size, method)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .output import console

    with Progress(TextColumn("counting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console(stderr=True), transient=True) as progress:
        task = progress.add_task("", total=len(variants))

        def done(variant, report):
            progress.update(task, advance=1, description=variant.name)

        return run(variants, size, batch_size, method, on_done=done)
