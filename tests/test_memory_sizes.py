"""Memory sizes (``--fit``, ``--max-memory``, ``VITLAB_MAX_MEMORY``): finite, positive, at most 1 EiB.

``inf``, ``1e999`` and ``nan`` ended in OverflowError; they are one error line naming the option
and the accepted forms. Expected byte counts are the units' definitions.
"""
from __future__ import annotations

import pytest

from vitlab.analysis.memory import memory_cap, parse_bytes, parse_gib
from vitlab.errors import VitlabError

from conftest import invoke_cli, one_error

ABSURD = ["inf", "-inf", "nan", "1e999", "0", "-1", "9" * 40 + "TiB", "2EiB", "1e30", "", "lots"]


@pytest.mark.parametrize("text", ABSURD)
def test_absurd_sizes_are_refused_with_the_accepted_forms(text):
    for parse, option in ((parse_gib, "--fit"), (parse_bytes, "--max-memory")):
        with pytest.raises(VitlabError, match=f"^{option}: expected a size such as 32GiB"):
            parse(text, option)


@pytest.mark.parametrize("text, expected", [("16", 16 * 2**30), ("0.5", 2**29), ("16GiB", 16 * 2**30),
                                            ("1.5 GB", 1_500_000_000), ("512MiB", 512 * 2**20)])
def test_fit_sizes(text, expected):
    assert parse_gib(text) == expected


def test_the_environment_variable_is_checked_the_same_way(monkeypatch):
    monkeypatch.setenv("VITLAB_MAX_MEMORY", "inf")
    with pytest.raises(VitlabError, match="^VITLAB_MAX_MEMORY: expected a size"):
        memory_cap()


@pytest.mark.parametrize("args", [("--fit", "inf"), ("--fit", "nan"), ("--fit", "1e999")])
def test_the_cli_gives_one_line(args):
    line = one_error(invoke_cli("flops", "vit_tiny_patch16_224", *args))
    assert "--fit: expected a size" in line
