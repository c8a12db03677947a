"""The comparison picture stays readable when the variants' sizes span orders of magnitude.

With ViT-22B beside ViT-Ti on linear axes every small model fell into one blob of overlapping labels.
The reports are vitlab's own counts; what is checked is how they are drawn.
"""
from __future__ import annotations

import pytest

from vitlab.analysis import analyze
from vitlab.analysis.plot import LOG_SPAN, comparison_figure, comparison_title


@pytest.fixture(scope="module")
def reports():
    return [analyze(name, method="derived") for name in ("vit_tiny_patch16_224", "vit_base_patch16_224", "vit_22b")]


def _axes(fig):
    top, bottom = fig.subfigs
    return top.axes[0], bottom.axes[0]


def test_a_wide_span_is_drawn_on_log_axes_with_bars_as_shares(reports):
    assert reports[-1].params / reports[0].params > LOG_SPAN
    scatter, bars = _axes(comparison_figure(reports))
    assert scatter.get_xscale() == "log" and scatter.get_yscale() == "log"
    assert "share" in bars.get_xlabel()
    widths = {}  # each variant's bar segments add up to its whole: 1
    for patch in bars.patches:
        y = round(patch.get_y() + patch.get_height() / 2)
        widths[y] = widths.get(y, 0.0) + patch.get_width()
    assert all(abs(w - 1.0) < 1e-9 for w in widths.values()) and len(widths) == 3
    texts = [t.get_text() for t in bars.texts]
    assert any("5,6" in t and "GFLOPs" in t for t in texts)  # ViT-22B's total, written out


def test_a_narrow_span_stays_linear_in_gflops(reports):
    scatter, bars = _axes(comparison_figure(reports[:2]))
    assert scatter.get_xscale() == "linear" and bars.get_xlabel() == "GFLOPs"


def test_the_title_names_the_comparison(reports):
    """The title once read "vitlab compare" whatever was compared."""
    fig = comparison_figure(reports, baseline="vit_base_patch16_224")
    assert fig._suptitle.get_text() == "vitlab compare: 3 variants against vit_base_patch16_224"
    swept = [f"vit_tiny[depth={d},mlp_ratio={r}]" for d in (6, 12) for r in (2, 4)]
    assert comparison_title(swept) == ("vitlab compare: vit_tiny over depth, mlp_ratio "
                                       "(4 variants, against depth=6,mlp_ratio=2)")
    assert comparison_title(swept, swept[3]).endswith("against depth=12,mlp_ratio=4)")
