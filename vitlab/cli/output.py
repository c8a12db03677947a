"""Formatting reports and comparison rows as a rich table, JSON, CSV or Markdown, and writing them
to stdout or (atomically, never over an existing file without ``--force``) to a file."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import click

from ..errors import VitlabError

FORMATS = ("table", "json", "csv", "md")
SUFFIX_FORMATS = {".json": "json", ".csv": "csv", ".md": "md", ".markdown": "md", ".txt": "table"}


def resolve_format(fmt: str | None, output: Path | None) -> str:
    """``--format`` if given, else from the output file's suffix, else ``table``."""
    if fmt is not None:
        return fmt
    if output is None:
        return "table"
    suffix = Path(output).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        known = ", ".join(SUFFIX_FORMATS)
        raise VitlabError(f"cannot tell the format of {output} from its suffix (known: {known}); pass --format")
    return SUFFIX_FORMATS[suffix]


def write(text: str, output: Path | None, force: bool = False) -> None:
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    from ..fileio import atomic_write

    atomic_write(output, text if text.endswith("\n") else text + "\n", force=force)
    click.echo(f"wrote {output}", err=True)


# --- numbers ----------------------------------------------------------------------------------------

def giga(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def mega(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def giga_sig(n: int) -> str:
    """4 significant digits, so that small parts (a head, the norms) do not read as 0.00."""
    return "0" if not n else f"{n / 1e9:.4g}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}%"


# --- plain formats -------------------------------------------------------------------------------------

def to_json(data: Any) -> str:
    return json.dumps(data, indent=2)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    for r in rows[1:]:
        columns += [c for c in r if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; ``align`` per column is ``l`` or ``r``."""
    align = align or ["l"] + ["r"] * (len(header) - 1)

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- rich ----------------------------------------------------------------------------------------------

def console(stderr: bool = False, file=None):
    from rich.console import Console

    if file is not None:
        return Console(file=file, width=140, soft_wrap=False, color_system=None)
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, soft_wrap=False, width=None if stream.isatty() else 140)


def render(*renderables, output: Path | None = None, force: bool = False) -> None:
    """Print rich renderables to stdout, or as plain text to ``output``."""
    if output is None:
        c = console()
        for r in renderables:
            c.print(r)
        return
    buf = io.StringIO()
    c = console(file=buf)
    for r in renderables:
        c.print(r)
    write(buf.getvalue(), output, force)


# --- one report ------------------------------------------------------------------------------------------

def _kind_rows(report) -> list[tuple[str, str, str]]:
    total = report.flops or 1
    return [(k, giga_sig(v), f"{100 * v / total:.2f}%") for k, v in report.by_kind.items()]


def _summary_pairs(report) -> list[tuple[str, str]]:
    h, w = report.img_size
    pairs = [
        ("FLOPs (fvcore, 1 per multiply-add)", f"{giga(report.flops)} G ({report.flops:,})"),
        ("parameters", (f"{report.params / 1e9:.2f} B" if report.params >= 1e9 else f"{mega(report.params)} M")
         + f" ({report.params:,})"),
        ("trainable parameters", f"{report.trainable_params:,}"),
        ("tokens", "-" if report.tokens is None else str(report.tokens)),
        ("activations", f"{mega(report.activations)} M"),
        ("input", f"{report.batch_size} x {h}x{w}"),
        ("FlopCounterMode (2 per multiply-add, no norms)",
         "-" if report.flop_counter is None else f"{giga(report.flop_counter)} G"),
        ("method", f"{report.method} ({'meta tensors: shapes only' if report.device == 'meta' else report.device + ' weights'})"),
    ]
    if report.derived:
        pairs.append(("derivation", report.derivation))
    pairs.append(("unsupported operators", ", ".join(f"{k} x{v}" for k, v in report.unsupported.items()) or "none"))
    pairs.append(("free operators (0 by convention)", ", ".join(f"{k} x{v}" for k, v in report.free_ops.items()) or "none"))
    return pairs


def report_tables(report) -> list:
    from rich.table import Table
    from rich.text import Text

    summary = Table(title=Text(report.name), show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for k, v in _summary_pairs(report):
        summary.add_row(Text(k), Text(v))
    kinds = Table(title="FLOPs by component kind", title_justify="left")
    kinds.add_column("kind")
    kinds.add_column("GFLOPs", justify="right")
    kinds.add_column("share", justify="right")
    for row in _kind_rows(report):
        kinds.add_row(*row)
    return [summary, kinds]


def report_markdown(report) -> str:
    head = f"### {report.name}\n\n"
    summary = to_markdown(["quantity", "value"], _summary_pairs(report), ["l", "l"])
    kinds = to_markdown(["kind", "GFLOPs", "share"], _kind_rows(report))
    return head + summary + "\n" + kinds


def emit_report(report, fmt: str, output: Path | None, force: bool) -> None:
    if fmt == "json":
        write(to_json(report.to_dict()), output, force)
    elif fmt == "csv":
        write(to_csv([report.summary()]), output, force)
    elif fmt == "md":
        write(report_markdown(report), output, force)
    else:
        render(*report_tables(report), output=output, force=force)


# --- comparison rows ---------------------------------------------------------------------------------------

def _flat(row: dict[str, Any], report) -> dict[str, Any]:
    flat = report.summary()
    flat["d_flops_%"] = row["d_flops_%"]
    flat["d_params_%"] = row["d_params_%"]
    flat["baseline"] = row["baseline"]
    return flat


def emit_rows(rows: Sequence[dict[str, Any]], reports: Sequence, fmt: str, output: Path | None, force: bool) -> None:
    if fmt == "json":
        write(to_json(list(rows)), output, force)
        return
    if fmt == "csv":
        write(to_csv([_flat(r, rep) for r, rep in zip(rows, reports)]), output, force)
        return
    header = ["variant", "GFLOPs", "params (M)", "tokens", "Δ FLOPs", "Δ params"]
    body = [
        [rep.name + (" *" if rep.derived else ""), giga(rep.flops), mega(rep.params), "-" if rep.tokens is None else rep.tokens,
         pct(r["d_flops_%"]), pct(r["d_params_%"])]
        for r, rep in zip(rows, reports)
    ]
    base = rows[0]["baseline"] if rows else ""
    foot = f"Δ against {base}; FLOPs in fvcore's convention (1 per multiply-add)"
    if any(rep.derived for rep in reports):
        foot += "; * derived from distinct blocks"
    from rich.table import Table
    from rich.text import Text

    table = Table(title="vitlab compare", title_justify="left", caption=Text(foot), caption_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for line in body:
        table.add_row(*(Text(str(v)) for v in line))
    if fmt == "md":
        write(to_markdown(header, body) + f"\n{foot}\n", output, force)
        if output is not None:  # the file is for keeping; the terminal still gets the table
            render(table)
        return
    render(table, output=output, force=force)
