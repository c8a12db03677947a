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

from ..errors import VitlabError, one_line, path_label

FORMATS = ("table", "json", "csv", "md")
MAX_CELL = 200  # characters of a name drawn in a table: a 100 MB variant name would hang the renderer


def shown(value: Any) -> str:
    """``value`` as a table or message shows it: one line, control characters escaped, at most
    ``MAX_CELL`` characters (JSON output keeps the whole value)."""
    text = one_line(str(value)[: 4 * MAX_CELL])
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"
SUFFIX_FORMATS = {".json": "json", ".csv": "csv", ".md": "md", ".markdown": "md", ".txt": "table"}


def resolve_format(fmt: str | None, output: Path | None, force: bool | None = None) -> str:
    """``--format`` if given, else from the output file's suffix, else ``table``.

    With ``force`` (``--force``'s value), also refuse an output path that cannot be written, so a
    command that starts by resolving its format fails before any work."""
    if output is not None and force is not None:
        from ..fileio import check_output

        check_output(output, force)
    if fmt is not None:
        return fmt
    if output is None:
        return "table"
    suffix = Path(output).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        known = ", ".join(SUFFIX_FORMATS)
        raise VitlabError(f"cannot tell the format of {path_label(output)} from its suffix (known: {known}); pass --format")
    return SUFFIX_FORMATS[suffix]


def write(text: str, output: Path | None, force: bool = False) -> None:
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    from ..fileio import atomic_write

    atomic_write(output, text if text.endswith("\n") else text + "\n", force=force)
    click.echo(f"wrote {path_label(output)}", err=True)


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


def mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def unsupported_warning(reports) -> str | None:
    """One line naming the variants whose count misses operators (counted as 0), or ``None``."""
    bad = [r for r in reports if r.unsupported]
    if not bad:
        return None
    ops = sorted({op for r in bad for op in r.unsupported})
    names = ", ".join(shown(r.name) for r in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return (f"WARNING: unsupported operators counted as 0 FLOPs ({', '.join(ops)}) in {names}: "
            "their FLOPs and changes are too low (! in the table)")


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
        writer.writerow({k: ("" if v is None else one_line(v) if isinstance(v, str) else v) for k, v in r.items()})
    return buf.getvalue()


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; ``align`` per column is ``l`` or ``r``."""
    align = align or ["l"] + ["r"] * (len(header) - 1)

    def cell(v: Any) -> str:
        return shown(v).replace("|", "\\|")  # a name stays in its cell, on its line

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
        ("tokens", report.tokens_text()),  # per stage, and out of the last block when merging changed them
        ("activations", f"{mega(report.activations)} M"),
        ("input", f"{report.batch_size} x {h}x{w}"),
        ("FlopCounterMode (2 per multiply-add, no norms)",
         "-" if report.flop_counter is None else f"{giga(report.flop_counter)} G"),
        ("method", f"{report.method} ({'meta tensors: shapes only' if report.device == 'meta' else report.device + ' weights'})"),
    ]
    if report.derived:
        pairs.append(("derivation", report.derivation))
    pairs.append(("unsupported operators", ", ".join(f"{k} x{v}" for k, v in report.unsupported.items())
                  + " (counted as 0: the FLOPs above are too low)" if report.unsupported else "none"))
    pairs.append(("free operators (0 by convention)", ", ".join(f"{k} x{v}" for k, v in report.free_ops.items()) or "none"))
    mem = report.memory
    if mem:
        how = report.dtype + (", gradient checkpointing" if report.grad_checkpointing else "")
        pairs += [
            (f"predicted training peak ({how})", f"{mib(mem['train_peak_bytes'])} MiB = params {mib(mem['params_bytes'])} "
             f"+ grads {mib(mem['grads_bytes'])} + AdamW {mib(mem['optimizer_bytes'])} + activations "
             f"{mib(mem['activations_bytes'])} + one block's backward"),
            ("predicted inference peak", f"{mib(mem['infer_peak_bytes'])} MiB"),
            ("activations by kind", ", ".join(f"{k} {mib(v)} MiB" for k, v in report.memory_by_kind.items()) or "-"),
        ]
    if report.fit:
        pairs.append((f"largest training batch in {report.fit['budget_bytes'] / 2**30:g} GiB",
                      str(report.fit["batch_size"])))
    if report.measured:
        m = report.measured
        pairs.append((f"measured on {m['device']} at batch {m['batch_size']}",
                      f"inference {m['infer_ms']:.1f} ms, {mib(m['infer_peak_bytes'])} MiB; training step "
                      f"{m['train_step_ms']:.1f} ms, {mib(m['train_peak_bytes'])} MiB"))
    return pairs


def free_op_rows(report) -> list[tuple[str, str, str]]:
    """(operator, calls, why it counts 0) for the free operators the trace met."""
    from ..analysis.handles import FREE_OPS

    return [(op, str(n), report.free_why.get(op) or FREE_OPS.get(op, "declared free by a plugin"))
            for op, n in report.free_ops.items()]


def report_tables(report) -> list:
    from rich.table import Table
    from rich.text import Text

    summary = Table(title=Text(shown(report.name)), show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for k, v in _summary_pairs(report):
        summary.add_row(Text(shown(k)), Text(one_line(v)))  # our own figures, whole
    kinds = Table(title="FLOPs by component kind", title_justify="left")
    kinds.add_column("kind")
    kinds.add_column("GFLOPs", justify="right")
    kinds.add_column("share", justify="right")
    for row in _kind_rows(report):
        kinds.add_row(*row)
    free = Table(title="Free operators (0 FLOPs by convention) and why", title_justify="left")
    for h in ("operator", "calls", "why"):
        free.add_column(h, justify="right" if h == "calls" else "left", overflow="fold")
    for row in free_op_rows(report):
        free.add_row(*row)
    return [summary, kinds] + ([free] if report.free_ops else [])


def report_markdown(report) -> str:
    head = f"### {shown(report.name)}\n\n"
    summary = to_markdown(["quantity", "value"], _summary_pairs(report), ["l", "l"])
    kinds = to_markdown(["kind", "GFLOPs", "share"], _kind_rows(report))
    free = to_markdown(["operator", "calls", "why it counts 0"], free_op_rows(report), ["l", "r", "l"]) if report.free_ops else ""
    return head + summary + "\n" + kinds + ("\n" + free if free else "")


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


def _ms(measured: dict[str, Any], key: str) -> str:
    """A median time with its spread: ``30.1 ±4%`` (slowest minus fastest run, % of the median)."""
    ms, spread = measured.get(key), measured.get(f"{key}_spread")
    if ms is None:
        return "-"
    return f"{ms:.1f}" + (f" ±{spread:.0f}%" if spread is not None else "")


def emit_rows(rows: Sequence[dict[str, Any]], reports: Sequence, fmt: str, output: Path | None, force: bool) -> None:
    if fmt == "json":
        write(to_json(list(rows)), output, force)
        return
    if fmt == "csv":
        write(to_csv([_flat(r, rep) for r, rep in zip(rows, reports)]), output, force)
        return
    measured = any(rep.measured for rep in reports)
    fit = next((rep.fit for rep in reports if rep.fit), None)
    header = ["variant", "GFLOPs", "params (M)", "tokens", "Δ FLOPs", "Δ params", "pred. train MiB"]
    if fit:  # --fit: the largest training batch predicted to fit the budget
        header.append(f"fit batch ({fit['budget_bytes'] / 2**30:g} GiB)")
    if measured:
        header += ["train ms", "img/s", "peak MiB", "infer ms"]
    body = []
    for r, rep in zip(rows, reports):
        mark = (" *" if rep.derived else "") + (" !" if rep.unsupported else "")
        line = [rep.name + mark, giga(rep.flops), mega(rep.params), rep.tokens_text(), pct(r["d_flops_%"]),
                pct(r["d_params_%"]), mib(rep.memory.get("train_peak_bytes"))]
        if fit:
            line.append("-" if not rep.fit else str(rep.fit["batch_size"]))
        if measured:
            m = rep.measured or {}
            ms = m.get("train_step_ms")
            line += [_ms(m, "train_step_ms"), "-" if not ms else f"{1000 * m['batch_size'] / ms:.1f}",
                     mib(m.get("train_peak_bytes")), _ms(m, "infer_ms")]
            if m.get("halved_from"):
                line[0] += f" (batch {m['batch_size']}, halved)"
        body.append(line)
    base = shown(rows[0]["baseline"]) if rows else ""
    dtype = reports[0].dtype if reports else "fp32"
    foot = (f"Δ against {base}; FLOPs in fvcore's convention (1 per multiply-add); memory predicted for "
            f"AdamW training in {dtype}")
    if measured:
        m = next(rep.measured for rep in reports if rep.measured)
        foot += (f"; measured: median training step (forward, backward, AdamW) on {m['device']} ±spread of the runs, "
                 "peak above the baseline")
    if any(rep.derived for rep in reports):
        foot += "; * derived from distinct blocks"
    warning = unsupported_warning(reports)
    caption = warning + "\n" + foot if warning else foot
    from rich.table import Table
    from rich.text import Text

    def table(title: str, columns: list[int], caption: str | None):
        t = Table(title=title, title_justify="left", caption=Text(caption) if caption else None, caption_justify="left")
        for i in columns:
            t.add_column(header[i], justify="left" if i == 0 else "right", overflow="fold")
        for line in body:
            t.add_row(*(Text(shown(line[i])) for i in columns))
        return t

    everything = list(range(len(header)))
    tables = [table("vitlab compare", everything, caption)]
    split = len(header) - 4 if measured else len(header)  # the measured columns are the last four
    if measured and output is None and console().width < 24 * len(header) // 2:
        # a narrow terminal (80 columns) squashed 11 columns into 4 characters each: two tables
        tables = [table("vitlab compare: counts and prediction", list(range(split)), None),
                  table("vitlab compare: measured", [0, *range(split, len(header))], caption)]
    if fmt == "md":
        write((f"> **{warning}**\n\n" if warning else "") + to_markdown(header, body) + f"\n{foot}\n", output, force)
        if output is not None:  # the file is for keeping; the terminal still gets the table
            render(*tables)
        return
    render(*tables, output=output, force=force)
