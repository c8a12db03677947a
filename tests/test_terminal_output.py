"""Nothing a user or a file names reaches the terminal raw: control characters are shown escaped.

The threats: ``ESC ] 0 ; ... BEL`` sets the terminal's title, ``ESC [ 2 J`` clears the screen, and a
newline in a recipe name forged a second ``ok:`` line in ``vitlab validate``. The expected escapes
are Python's own ``repr`` of each character.
"""
from __future__ import annotations

import io
import json

import pytest
import yaml

from vitlab.terminal import GuardedStream, escape_controls

from conftest import TINY, invoke_cli

EVIL = "evil\nok: forged\x1b]0;TITLE\x07\x1b[2J\r\x9b\u202e"
ESCAPED = "evil\\nok: forged\\x1b]0;TITLE\\x07\\x1b[2J\\r\\x9b\\u202e"


def test_escape_controls_keeps_lines_tabs_and_colours_only():
    assert escape_controls(EVIL) == "evil\nok: forged\\x1b]0;TITLE\\x07\\x1b[2J\\r\\x9b\\u202e"
    assert escape_controls("\x1b[1;31mred\x1b[0m\tcell\n") == "\x1b[1;31mred\x1b[0m\tcell\n"  # rich's own SGR
    assert escape_controls("\x00\x7f\u200b") == "\\x00\\x7f\\u200b"


def test_a_guarded_stream_writes_escaped_text():
    raw = io.StringIO()
    guarded = GuardedStream(raw)
    guarded.write("name: \x1b]0;x\x07\n")
    assert raw.getvalue() == "name: \\x1b]0;x\\x07\n" and not guarded.isatty()


def _recipe(tmp_path, name=EVIL):
    path = tmp_path / "evil\x1b[2J.yaml"
    path.write_text(yaml.safe_dump({**TINY, "name": name}))
    return path


def _no_raw_controls(text: str) -> None:
    assert not any(c in text for c in "\x1b\x07\r\x9b\u202e"), repr(text)


def test_validate_prints_one_ok_line_per_recipe(tmp_path):
    res = invoke_cli("validate", _recipe(tmp_path))
    assert res.exit_code == 0, res.output
    (line,) = res.stdout.splitlines()
    assert line.startswith("ok: ") and ESCAPED in line
    _no_raw_controls(res.stdout)


@pytest.mark.parametrize("fmt", ["table", "md", "csv"])
def test_report_and_comparison_tables_escape_names(tmp_path, fmt):
    recipe = _recipe(tmp_path)
    for args in (("flops", recipe), ("compare", recipe, recipe)):
        res = invoke_cli(*args, "--format", fmt)
        assert res.exit_code == 0, res.output
        assert "ok: forged" not in res.stdout.replace("\\nok: forged", ""), res.stdout  # never a line of its own
        _no_raw_controls(res.stdout)


def test_json_output_stays_json_with_the_name_intact(tmp_path):
    res = invoke_cli("flops", _recipe(tmp_path), "--format", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["name"] == EVIL  # JSON escapes it itself, and keeps the value exact


def test_error_lines_escape_what_they_quote(tmp_path):
    path = tmp_path / "bad\nerror: forged\x1b]0;t\x07.yaml"
    path.write_text("depth: [\n")
    res = invoke_cli("validate", path)
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    _no_raw_controls(res.stderr)


def test_the_cli_process_guards_its_streams(tmp_path, run_python):
    """The real entry point: whatever a command prints passes through the guard."""
    recipe = _recipe(tmp_path)
    res = run_python("-c", "import sys; from vitlab.cli import main; sys.argv = ['vitlab', 'validate', sys.argv[1]]; main()",
                     str(recipe))
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1 and ESCAPED in res.stdout
    _no_raw_controls(res.stdout + res.stderr)
