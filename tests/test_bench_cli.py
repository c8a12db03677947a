"""`vitlab bench` (issue 7): runs end to end and reports consistent figures."""
from __future__ import annotations

import json

from click.testing import CliRunner

import vitlab
from vitlab.cli import cli, load_commands


def test_bench_reports_consistent_figures():
    load_commands()
    args = ["bench", "vit_tiny_patch16_224", "--set", "img_size=32", "--set", "patch_size=8", "--set", "depth=1",
            "--batch-size", "2", "--iters", "1", "--json", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    spec = vitlab.load_spec("vit_tiny_patch16_224", overrides=["img_size=32", "patch_size=8", "depth=1"])
    assert r["macs_per_image"] == vitlab.analyze(spec).flops
    assert abs(r["images_per_s"] - 2 / r["seconds_per_step"]) < 1e-6 * r["images_per_s"]
    assert abs(r["achieved_gmacs"] - r["macs_per_image"] * 2 / r["seconds_per_step"] / 1e9) < 1e-6 * r["achieved_gmacs"]
    assert abs(r["efficiency"] - r["achieved_gmacs"] / r["matmul_gmacs"]) < 1e-9


def test_bench_train_mode_and_bad_device():
    load_commands()
    base = ["bench", "vit_tiny_patch16_224", "--set", "img_size=32", "--set", "patch_size=8", "--set", "depth=1",
            "--batch-size", "2", "--iters", "1"]
    res = CliRunner().invoke(cli, base + ["--train"])
    assert res.exit_code == 0 and "train batch 2" in res.output, res.output
    res = CliRunner().invoke(cli, base + ["--device", "nonsense"])
    assert res.exit_code == 2 and "--device" in res.output and "Traceback" not in res.output
