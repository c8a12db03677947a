"""The command line says what is true, quickly: help without torch, help texts that match what the
commands do, and the figures a command computes shown where a user looks."""
from __future__ import annotations

import csv
import io
import json
import re

import pytest
import yaml

from conftest import invoke_cli

HELP_SCRIPT = """
import sys
from vitlab.cli import main
sys.argv = ["vitlab", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("\\nHEAVY", sorted(m for m in ("torch", "timm", "fvcore", "matplotlib") if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["flops", "--help"], ["compare", "--help"], ["attention", "--help"]])
def test_help_imports_no_torch(run_python, args):
    """``vitlab --help`` took 4 s and 650 MB importing torch."""
    res = run_python("-c", HELP_SCRIPT, *args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "HEAVY []" and "Usage:" in res.stdout


def _help(*command) -> str:
    return " ".join(invoke_cli(*command, "--help").stdout.split())


def test_help_texts_match_the_commands():
    flops = _help("flops")
    assert "--measure" not in flops and "plot" not in flops  # flops has neither
    assert "auto: full on meta tensors" not in flops and "auto: derived in compare" in flops
    assert not re.search(r"\d{15,}", _help("attention"))  # --seed's range is said in words


def test_show_has_no_transition_without_stages():
    shown = yaml.safe_load(invoke_cli("show", "vit_tiny_patch16_224").stdout)
    assert "transition" not in shown
    staged = yaml.safe_load(invoke_cli("show", "pit_ti_like").stdout)
    assert staged["stages"] and "transition" in staged


def test_compare_fit_shows_the_batch_in_the_table():
    res = invoke_cli("compare", "vit_tiny_patch16_224", "--set", "depth=1", "--fit", "1", "--format", "md")
    assert res.exit_code == 0, res.output
    header, _, row = res.stdout.splitlines()[:3]
    assert "fit batch (1 GiB)" in header
    data = json.loads(invoke_cli("compare", "vit_tiny_patch16_224", "--set", "depth=1", "--fit", "1",
                                 "--format", "json").stdout)
    assert row.split("|")[-2].strip() == str(data[0]["fit"]["batch_size"])


def test_compare_fit_is_a_csv_column_too():
    res = invoke_cli("compare", "vit_tiny_patch16_224", "--set", "depth=1", "--fit", "1", "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    data = json.loads(invoke_cli("compare", "vit_tiny_patch16_224", "--set", "depth=1", "--fit", "1",
                                 "--format", "json").stdout)
    assert rows[0]["fit.budget_bytes"] == str(2**30)
    assert rows[0]["fit.batch_size"] == str(data[0]["fit"]["batch_size"]) and int(rows[0]["fit.batch_size"]) > 1


def test_a_budget_too_small_for_one_image_is_an_error():
    """``--fit 1MiB`` once printed batch 0 with no warning: it is one error line naming the need."""
    from vitlab.analysis import analyze

    need = analyze("vit_tiny_patch16_224", batch_size=1).memory["train_peak_bytes"]
    for command in ("flops", "compare"):
        res = invoke_cli(command, "vit_tiny_patch16_224", "--fit", "1MiB", "--format", "json")
        assert res.exit_code == 2 and not res.stdout
        [line] = res.stderr.splitlines()
        assert line.startswith("error: --fit 1.0 MiB: not even one image of vit_tiny_patch16_224")
        assert f"{need / 2**20:.1f} MiB" in line, (line, need)


def test_a_measured_comparison_splits_into_two_tables_at_80_columns(monkeypatch):
    """At 80 columns the 11-column --measure table squashed into 4-character columns."""
    from vitlab.cli import output

    from vitlab.analysis import analyze
    from vitlab.analysis.compare import rows

    reports = [analyze("vit_tiny_patch16_224", method="derived"), analyze("vit_small_patch16_224", method="derived")]
    for r in reports:
        r.measured = {"device": "cpu", "batch_size": 2, "infer_ms": 10.0, "train_step_ms": 30.0,
                      "infer_peak_bytes": 2**20, "train_peak_bytes": 2**21}
    from rich.console import Console

    printed, width = [], [80]
    monkeypatch.setattr(output, "render", lambda *tables, **kw: printed.append(tables))
    monkeypatch.setattr(output, "console", lambda *a, **k: Console(width=width[0]))  # a terminal's width
    output.emit_rows(rows(reports), reports, "table", None, False)
    (tables,) = printed
    assert [len(t.columns) for t in tables] == [7, 5]  # counts and prediction; the variant and 4 measured
    assert [c.header for c in tables[1].columns] == ["variant", "train ms", "img/s", "peak MiB", "infer ms"]
    printed.clear()
    width[0] = 200
    output.emit_rows(rows(reports), reports, "table", None, False)
    assert [len(t.columns) for t in printed[0]] == [11]


def test_flops_shows_tokens_per_stage_as_compare_does():
    """``flops`` showed ``tokens 197`` where ``compare`` showed the tokens of every stage."""
    flops = " ".join(invoke_cli("flops", "pit_ti_like").stdout.split())
    compare = invoke_cli("compare", "pit_ti_like", "--format", "md").stdout
    tokens = compare.splitlines()[2].split("|")[4].strip()
    assert tokens.count("→") == 2 and f"tokens │ {tokens}" in flops
