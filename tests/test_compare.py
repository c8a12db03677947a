"""``vitlab flops`` and ``vitlab compare`` (issue 3): formats, sweeps, baselines, files, plots."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import vitlab.cli.analysis_cmds  # noqa: F401  (registers the commands)
from vitlab.analysis.compare import expand, parse_sweep, rows
from vitlab.analysis.report import KIND_KEYS
from vitlab.cli import cli
from vitlab.errors import VitlabError

TINY = "vit_tiny_patch16_224"
# ViT-Ti/16 at 224 px, closed form of the issue: patch conv + 12 blocks + 25 LayerNorms + head
N, D = 197, 192
TI_FLOPS = 196 * D * 3 * 16 * 16 + 12 * (12 * N * D * D + 2 * N * N * D) + 25 * 5 * N * D + D * 1000


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def ok(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(*args: str) -> str:
    """Exit 2 and exactly one error line."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- vitlab flops ------------------------------------------------------------------------------------------

def test_flops_json():
    data = json.loads(ok("flops", TINY, "--format", "json"))
    assert data["name"] == TINY and data["flops"] == TI_FLOPS and data["tokens"] == 197
    assert data["params"] == 5_717_416
    assert list(data["by_kind"]) == list(KIND_KEYS) and sum(data["by_kind"].values()) == TI_FLOPS
    assert data["unsupported"] == {} and data["derived"] is False


def test_flops_table_csv_md():
    table = ok("flops", TINY)
    assert "1.26 G" in table and "attention" in table and "mlp" in table
    rows_ = list(csv.DictReader(io.StringIO(ok("flops", TINY, "--format", "csv"))))
    assert len(rows_) == 1 and int(rows_[0]["flops"]) == TI_FLOPS and rows_[0]["name"] == TINY
    md = ok("flops", TINY, "--format", "md")
    assert md.startswith("### vit_tiny_patch16_224") and "|:---|" in md and "| attention |" in md


def test_flops_set_img_size_batch():
    data = json.loads(ok("flops", TINY, "--set", "depth=6", "--img-size", "384", "-b", "2", "--format", "json"))
    n = 24 * 24 + 1
    assert data["tokens"] == n and data["img_size"] == [384, 384] and data["batch_size"] == 2
    per_image = 576 * D * 3 * 256 + 6 * (12 * n * D * D + 2 * n * n * D) + 13 * 5 * n * D + D * 1000
    assert data["flops"] == 2 * per_image


def test_flops_derived_method_says_so():
    data = json.loads(ok("flops", TINY, "--method", "derived", "--format", "json"))
    assert data["flops"] == TI_FLOPS and data["derived"] is True and "12 blocks" in data["derivation"]
    assert "derivation" in ok("flops", TINY, "--method", "derived")


def test_flops_errors_are_one_line():
    assert "not found" in fails("flops", "no_such_recipe")
    assert "depht" in fails("flops", TINY, "--set", "depht=3")
    assert "--img-size" in fails("flops", TINY, "--img-size", "big")
    assert "divisible" in fails("flops", TINY, "--img-size", "100")


def test_flops_output_file(tmp_path):
    out = tmp_path / "r.json"
    invoke("flops", TINY, "-o", str(out))
    assert json.loads(out.read_text())["flops"] == TI_FLOPS
    assert "already exists" in fails("flops", TINY, "-o", str(out))
    ok("flops", TINY, "--set", "depth=6", "-o", str(out), "--force")
    assert json.loads(out.read_text())["flops"] < TI_FLOPS
    assert "suffix" in fails("flops", TINY, "-o", str(tmp_path / "r.xyz"))
    assert not list(tmp_path.glob(".r.*"))  # no temporary files left behind


# --- sweeps ------------------------------------------------------------------------------------------------

def test_parse_sweep():
    s = parse_sweep("pos_embed.name=learned,sincos2d")
    assert s.key == "pos_embed.name" and [v for _, v in s.values] == ["learned", "sincos2d"]
    assert [v for _, v in parse_sweep("img_size=[160,224],224").values] == [[160, 224], 224]
    assert [v for _, v in parse_sweep("depth=6, 12").values] == [6, 12]
    for bad in ("depth", "=1,2", "depth=", "depth=1,,2"):
        with pytest.raises(VitlabError):
            parse_sweep(bad)


def test_expand_cartesian_on_each_recipe():
    variants = expand([TINY, "vit_tiny_nopos"], [parse_sweep("depth=2,4"), parse_sweep("mlp_ratio=2,4")], ["num_classes=10"])
    assert len(variants) == 8
    assert variants[0].name == f"{TINY}[depth=2,mlp_ratio=2]"
    assert variants[-1].name == "vit_tiny_nopos[depth=4,mlp_ratio=4]"
    assert all(v.spec.num_classes == 10 for v in variants)
    assert variants[3].spec.depth == 4 and variants[3].spec.mlp_ratio == 4


def test_rows_baseline_and_deltas():
    from vitlab.analysis.compare import run

    reports = run(expand([TINY], [parse_sweep("depth=1,2")]))
    table = rows(reports)
    assert table[0]["d_flops_%"] == 0 and table[0]["baseline"] == f"{TINY}[depth=1]"
    expected = 100 * (reports[1].flops - reports[0].flops) / reports[0].flops
    assert table[1]["d_flops_%"] == pytest.approx(expected, abs=1e-3)
    table = rows(reports, baseline=f"{TINY}[depth=2]")
    assert table[1]["d_params_%"] == 0 and table[0]["d_params_%"] < 0
    with pytest.raises(VitlabError, match="depth=1"):
        rows(reports, baseline="nope")


# --- vitlab compare ----------------------------------------------------------------------------------------

def test_compare_json_is_list_of_flops_objects():
    data = json.loads(ok("compare", TINY, "vit_small_patch16_224", "--format", "json"))
    single = json.loads(ok("flops", TINY, "--format", "json"))
    assert [d["name"] for d in data] == [TINY, "vit_small_patch16_224"]
    # compare derives each variant from distinct pieces counted once (issue 14): equal to the full trace
    method = ("derived", "derivation", "method")
    assert {k: v for k, v in data[0].items() if k in single and k not in method} == {
        k: v for k, v in single.items() if k not in method}
    assert data[0]["method"] == "derived" and single["method"] == "full"
    assert data[0]["d_flops_%"] == 0 and data[1]["d_flops_%"] > 0


def test_compare_sweep_table():
    out = ok("compare", TINY, "--sweep", "depth=6,12", "--sweep", "pos_embed.name=learned,sincos2d")
    for name in ("[depth=6,pos_embed.name=learned]", "[depth=12,pos_embed.name=sincos2d]"):
        assert name in out  # brackets survive rich markup
    assert "+95.4" in out  # depth 12 against depth 6: the blocks double, the stem does not


def test_compare_baseline_option():
    data = json.loads(ok("compare", TINY, "--sweep", "depth=6,12", "--baseline", f"{TINY}[depth=12]", "--format", "json"))
    assert data[1]["d_flops_%"] == 0 and data[0]["d_flops_%"] < 0
    line = fails("compare", TINY, "--sweep", "depth=6,12", "--baseline", "vit_tiny")
    assert "unknown baseline 'vit_tiny'" in line and f"{TINY}[depth=6]" in line


def test_compare_errors_are_one_line():
    assert "KEY=V1,V2" in fails("compare", TINY, "--sweep", "depth")
    assert "depht" in fails("compare", TINY, "--sweep", "depht=1,2")
    assert "twice" in fails("compare", TINY, "--sweep", "depth=1", "--sweep", "depth=2")
    assert "no_such" in fails("compare", TINY, "no_such")


def test_compare_outputs_and_plot(tmp_path):
    csv_path, md_path, png = tmp_path / "c.csv", tmp_path / "c.md", tmp_path / "c.png"
    ok("compare", TINY, "--sweep", "depth=2,4", "--set", "num_classes=10", "-o", str(csv_path), "--plot", str(png))
    got = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [r["name"] for r in got] == [f"{TINY}[depth=2]", f"{TINY}[depth=4]"]
    assert {"flops", "params", "tokens", "d_flops_%", "d_params_%", "flops.attention"} <= set(got[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "already exists" in fails("compare", TINY, "--plot", str(png))
    ok("compare", TINY, "-o", str(md_path), "--plot", str(png), "--force")
    assert md_path.read_text().startswith("| variant |")
    assert "PNG" in fails("compare", TINY, "--plot", str(tmp_path / "x.jpg"))


def test_plot_many_variants(tmp_path):
    """Many variants: numbered points and a legible bar chart (the figure is built and saved)."""
    from vitlab.analysis.compare import run
    from vitlab.analysis.plot import comparison_figure, save_comparison, short_labels

    reports = run(expand([TINY], [parse_sweep("depth=1,2,3"), parse_sweep("mlp_ratio=2,4"), parse_sweep("num_heads=3,6")]))
    assert short_labels([r.name for r in reports])[0] == "depth=1,mlp_ratio=2,num_heads=3"
    fig = comparison_figure(reports, baseline=reports[0].name)
    assert len(fig.axes) == 2
    save_comparison(reports, tmp_path / "many.png")
    assert (tmp_path / "many.png").stat().st_size > 10_000


def test_python_m_vitlab_flops_smoke():
    out = subprocess.run([sys.executable, "-m", "vitlab", "flops", TINY, "--format", "json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["flops"] == TI_FLOPS
    bad = subprocess.run([sys.executable, "-m", "vitlab", "compare", TINY, "--sweep", "depth"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_shards_together_equal_the_whole_sweep():
    """Array jobs: the shards' rows, merged, are the unsharded rows (baseline deltas included)."""
    args = ["compare", "vit_tiny_patch16_224", "--sweep", "depth=1,2,3", "--sweep", "pos_embed.name=learned,none", "--format", "json"]
    whole = json.loads(invoke(*args).output)
    parts = [json.loads(invoke(*args, "--shard", f"{i}/3").output) for i in range(3)]
    merged = sorted((r for p in parts for r in p), key=lambda r: r["name"])
    assert [r["name"] for r in merged] == sorted(r["name"] for r in whole) and len(merged) == 6
    assert merged == sorted(whole, key=lambda r: r["name"])


@pytest.mark.parametrize("bad", ["2/2", "x/3", "1", "-1/2", "0/0"])
def test_bad_shard_is_one_line_exit_2(bad):
    res = CliRunner().invoke(cli, ["compare", "vit_tiny_patch16_224", "--shard", bad])
    assert res.exit_code == 2 and "--shard" in res.output and "Traceback" not in res.output
