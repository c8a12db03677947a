"""``compare`` checks every file it will write before any work, the cost plot ``NAME.cost.png`` included.

Before, the cost plot replaced the JSON ``--output`` when their names collided, and an existing
``NAME.cost.png`` was found only after every variant had been counted and measured.
"""
from __future__ import annotations

import pytest

from conftest import invoke_cli, one_error

TINY = ("vit_tiny_patch16_224", "--set", "depth=1", "--set", "img_size=32")


@pytest.fixture
def no_work(monkeypatch):
    """Counting or measuring anything fails the test: refusals must come first."""
    import vitlab.analysis.compare as compare
    import vitlab.measure as measure

    def forbidden(*a, **k):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(compare, "run", forbidden)
    monkeypatch.setattr(measure, "measure_spec", forbidden)


def test_the_cost_plot_may_not_be_the_output(tmp_path, no_work):
    line = one_error(invoke_cli("compare", *TINY, "--measure", "--plot", tmp_path / "m.png",
                                "-o", tmp_path / "m.cost.png", "--format", "json"))
    assert "--output and the cost plot name the same file" in line
    assert list(tmp_path.iterdir()) == []


def test_an_existing_cost_plot_is_refused_before_any_work(tmp_path, no_work):
    (tmp_path / "m.cost.png").write_bytes(b"mine")
    line = one_error(invoke_cli("compare", *TINY, "--measure", "--plot", tmp_path / "m.png"))
    assert "m.cost.png already exists; pass --force" in line
    assert (tmp_path / "m.cost.png").read_bytes() == b"mine" and not (tmp_path / "m.png").exists()


def test_without_measurements_no_cost_plot_is_written_or_checked(tmp_path):
    (tmp_path / "m.cost.png").write_bytes(b"mine")
    res = invoke_cli("compare", *TINY, "--plot", tmp_path / "m.png", "--format", "json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "m.cost.png").read_bytes() == b"mine"
