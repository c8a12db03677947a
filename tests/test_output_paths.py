"""Outputs never replace what they should not: devices, FIFOs, or a file that appeared meanwhile.

The threats: ``-o /dev/null --force`` and a FIFO with ``--force`` were replaced by regular files,
and a file created at the output path while vitlab was writing was overwritten without ``--force``.
"""
from __future__ import annotations

import os

import pytest

from vitlab.errors import VitlabError
from vitlab.fileio import atomic_write, check_output

from conftest import invoke_cli, one_error


@pytest.mark.parametrize("force", [False, True])
def test_a_fifo_is_never_replaced(tmp_path, force):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    with pytest.raises(VitlabError, match="not a regular file"):
        atomic_write(fifo, "{}", force=force)
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp left


def test_dev_null_is_refused_even_with_force():
    with pytest.raises(VitlabError, match="not a regular file"):
        check_output("/dev/null", force=True)


def test_the_cli_refuses_a_device_output_before_any_work(tmp_path):
    line = one_error(invoke_cli("flops", "vit_tiny_patch16_224", "-o", "/dev/null", "--force", "--format", "json"))
    assert "/dev/null is not a regular file" in line


def test_a_file_that_appears_during_the_write_is_kept(tmp_path):
    out = tmp_path / "report.json"

    def writer(tmp):  # another program creates the output while vitlab writes its temp file
        tmp.write_text("vitlab's")
        out.write_text("theirs")

    with pytest.raises(VitlabError, match="appeared while it was being written; pass --force"):
        atomic_write(out, writer)
    assert out.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_with_force_a_regular_file_is_replaced_atomically(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("old")
    atomic_write(out, "new", force=True)
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    atomic_write(tmp_path / "fresh.json", "x")
    assert (tmp_path / "fresh.json").read_text() == "x"


def test_python_callers_are_told_force_true_not_the_cli_flag(tmp_path):
    import vitlab

    from conftest import TINY

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"keep")
    model = vitlab.build_model(vitlab.load_spec(TINY), seed=0)
    with pytest.raises(VitlabError, match=r"already exists; pass force=True to overwrite it$"):
        vitlab.save(model, path)
    assert path.read_bytes() == b"keep"
