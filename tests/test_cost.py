"""Issue 14: predicted memory against real runs, the resource guard, measured cost, visible
warnings and exact cached sweeps. Reference figures come from real CPU runs (autograd's saved
tensors, the process's peak) and closed forms, never from the code under test."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import vitlab
import vitlab.cli.analysis_cmds  # noqa: F401  (registers flops and compare)
import vitlab.cli.bench_cmds  # noqa: F401  (registers bench)
from vitlab.analysis import analyze
from vitlab.analysis.compare import expand, parse_sweep, run
from vitlab.analysis.memory import MAX_BATCH, MEMORY_KEYS, check_fits, parse_bytes
from vitlab.cli import cli
from vitlab.errors import VitlabError
from vitlab.measure import MEASURED_KEYS, measure_spec

TINY = "vit_tiny_patch16_224"
SMALL = ["img_size=64", "depth=2"]  # a few milliseconds per step


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- predicted memory -------------------------------------------------------------------------------------

def test_memory_keys_and_closed_forms():
    report = analyze(TINY, batch_size=4)
    mem = report.memory
    assert list(mem) == list(MEMORY_KEYS)
    params = 5_717_416  # ViT-Ti/16 (timm), all trainable, fp32; buffers: none
    assert mem["params_bytes"] == 4 * params and mem["grads_bytes"] == 4 * params
    assert mem["optimizer_bytes"] == 8 * params  # AdamW: two fp32 moments
    assert mem["train_peak_bytes"] > mem["params_bytes"] + mem["grads_bytes"] + mem["optimizer_bytes"] + mem["activations_bytes"]
    assert sum(report.memory_by_kind.values()) == mem["activations_bytes"]
    assert {"attention", "mlp", "norm"} <= set(report.memory_by_kind)
    # activations are linear in the batch; parameters are not
    double = analyze(TINY, batch_size=8).memory
    assert double["activations_bytes"] == 2 * mem["activations_bytes"] and double["params_bytes"] == mem["params_bytes"]
    bf16 = analyze(TINY, batch_size=4, dtype="bf16").memory
    assert bf16["params_bytes"] == 2 * params and bf16["optimizer_bytes"] == 8 * params
    assert 0.45 < bf16["activations_bytes"] / mem["activations_bytes"] < 0.55  # log-sum-exps stay fp32
    ckpt = analyze(TINY, batch_size=4, grad_checkpointing=True)
    # checkpointed: 12 block inputs (B, 197, 192) fp32 are kept, plus one block's saved set
    assert ckpt.memory_by_kind["checkpoint inputs"] == 12 * 4 * 197 * 192 * 4
    assert ckpt.memory["activations_bytes"] < mem["activations_bytes"] / 4
    with pytest.raises(VitlabError, match="dtype"):
        analyze(TINY, dtype="fp8")


def _cpu_saved_bytes(model, x) -> int:
    """What autograd really saves in a CPU training forward (unique storages, parameters excluded)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.parametrize("recipe, overrides", [
    (TINY, ["depth=2"]),
    ("vit_tiny_swiglu", ["depth=2", "img_size=96"]),
    ("vit_tiny_postnorm", ["depth=2", "img_size=96"]),
])
def test_predicted_activations_equal_a_real_cpu_forward(recipe, overrides):
    spec = vitlab.load_spec(recipe, overrides=overrides)
    model = vitlab.build_model(spec, seed=0).train()
    x = torch.randn(2, 3, *spec.img_hw)
    assert analyze(spec, batch_size=2).memory["activations_bytes"] == _cpu_saved_bytes(model, x)


@pytest.mark.parametrize("recipe", [TINY, "vit_small_patch16_224"])
def test_predicted_training_peak_within_25_percent_of_measured_cpu_peak(recipe):
    """The done-when of issue 14: batch 8 on CPU, the peak measured in a fresh process."""
    spec = vitlab.load_spec(recipe)
    measured = measure_spec(spec, 8, device="cpu", warmup=1, repeats=1)
    assert list(measured)[:6] == list(MEASURED_KEYS)
    predicted = analyze(spec, batch_size=8).memory["train_peak_bytes"]
    assert 0.75 <= predicted / measured["train_peak_bytes"] <= 1.25, (predicted, measured)


def test_fit_gives_the_largest_batch_that_fits():
    out = invoke("flops", TINY, "--fit", "1", "--format", "json")
    data = json.loads(out.stdout)
    batch = data["fit"]["batch_size"]
    assert data["fit"]["budget_bytes"] == 2**30 and batch > 1
    assert analyze(TINY, batch_size=batch).memory["train_peak_bytes"] <= 2**30
    assert analyze(TINY, batch_size=batch + 1).memory["train_peak_bytes"] > 2**30
    assert "--fit" in one_error_line(CliRunner().invoke(cli, ["flops", TINY, "--fit", "lots"]))


# --- the resource guard -----------------------------------------------------------------------------------

def test_check_fits_and_the_cap(monkeypatch):
    check_fits(2**20, "a small job", max_memory="1GiB")
    with pytest.raises(VitlabError, match="needs about 2.0 GiB") as err:
        check_fits(2 * 2**30, "a big job", max_memory="1GiB")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("VITLAB_MAX_MEMORY", "4GiB")
    check_fits(2 * 2**30, "a big job")
    assert parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes("512MiB") == 2**29
    with pytest.raises(VitlabError, match="VITLAB_MAX_MEMORY"):
        parse_bytes("lots")


def test_commands_refuse_what_cannot_fit_before_allocating():
    line = one_error_line(CliRunner().invoke(cli, ["bench", TINY, "-b", "8"], env={"VITLAB_MAX_MEMORY": "10MiB"}))
    assert "needs about" in line and "VITLAB_MAX_MEMORY" in line
    line = one_error_line(CliRunner().invoke(cli, ["compare", TINY, "--measure", "-b", "4"],
                                             env={"VITLAB_MAX_MEMORY": "10MiB"}))
    assert "training at batch 4" in line


@pytest.mark.parametrize("command", [["flops", TINY], ["compare", TINY], ["bench", TINY]])
def test_absurd_batch_is_refused_up_front(command):
    line = one_error_line(CliRunner().invoke(cli, [*command, "--batch-size", str(10**12)]))
    assert "--batch-size" in line and str(MAX_BATCH) in line


def test_largest_batch_counts_without_overflow():
    report = analyze(TINY, batch_size=MAX_BATCH)
    assert report.flops == MAX_BATCH * analyze(TINY).flops
    assert report.memory["activations_bytes"] == MAX_BATCH * analyze(TINY).memory["activations_bytes"]


# --- measured cost ----------------------------------------------------------------------------------------

def test_compare_measure_json_table_and_merge(tmp_path):
    args = ["compare", TINY, "--sweep", "depth=1,2", *(a for s in SMALL[:1] for a in ("--set", s)),
            "--measure", "--repeats", "1", "-b", "2"]
    parts = []
    for i in range(2):
        path = tmp_path / f"part-{i}.json"
        assert invoke(*args, "--shard", f"{i}/2", "-o", str(path)).exit_code == 0
        parts.append(path)
    rows = [r for p in parts for r in json.loads(p.read_text())]
    assert [r["name"] for r in rows] == [f"{TINY}[depth=1]", f"{TINY}[depth=2]"]
    for r in rows:
        assert list(r["measured"])[:6] == list(MEASURED_KEYS) and r["measured"]["batch_size"] == 2
        assert list(r["memory"]) == list(MEMORY_KEYS)
    png = tmp_path / "m.png"
    out = invoke("compare", "--merge", *map(str, parts), "--format", "md", "--plot", str(png))
    assert out.exit_code == 0, out.output
    header = out.stdout.splitlines()[0]
    for column in ("train ms", "img/s", "peak MiB", "pred. train MiB"):
        assert column in header
    assert png.exists() and png.with_suffix(".cost.png").read_bytes()[:4] == b"\x89PNG"
    assert "--merge" in one_error_line(CliRunner().invoke(cli, ["compare", "--merge", str(tmp_path / "nope.json")]))


@pytest.mark.parametrize("error", ["killed (out of memory)",  # the kernel's OOM killer
                                   "RuntimeError: DefaultCPUAllocator: can't allocate memory"])  # not CUDA's wording
def test_out_of_memory_halves_the_batch(monkeypatch, error):
    import vitlab.measure as measure

    calls = []

    def child(spec_json, batch, *rest):
        calls.append(batch)
        if batch > 2:
            return {"error": error, "oom": True}
        return {"device": "cpu", "batch_size": batch, "infer_ms": 1.0, "train_step_ms": 2.0,
                "infer_peak_bytes": 1, "train_peak_bytes": 2}

    monkeypatch.setattr(measure, "_child", child)
    got = measure.measure_spec(vitlab.load_spec(TINY), 8, device="cpu")
    assert calls[:3] == [8, 4, 2] and got["batch_size"] == 2 and got["halved_from"] == 8 and "batch 2" in got["note"]


# --- visible warnings -------------------------------------------------------------------------------------

def test_unsupported_operators_are_visible_in_table_and_markdown(tmp_path):
    from vitlab.analysis.compare import rows
    from vitlab.cli.output import emit_rows

    reports = run(expand([TINY], [parse_sweep("depth=1,2")]))
    reports[1].unsupported = {"aten::mish": 2}  # what a Mish MLP reports
    md = tmp_path / "c.md"
    emit_rows(rows(reports), reports, "md", md, False)
    text = md.read_text()
    assert text.startswith("> **WARNING: unsupported operators") and "aten::mish" in text and "depth=2] * !" in text
    table = tmp_path / "c.txt"
    emit_rows(rows(reports), reports, "table", table, False)
    assert "WARNING: unsupported operators" in table.read_text()


def test_flops_gives_the_reasons_for_free_operators():
    from vitlab.analysis.handles import FREE_OPS

    out = invoke("flops", TINY).stdout
    assert "Free operators" in out and FREE_OPS["aten::gelu"][:40] in out.replace("\n", " ").replace("│", " ")
    md = invoke("flops", TINY, "--format", "md").stdout
    assert f"| aten::gelu | 12 | {FREE_OPS['aten::gelu']} |" in md


# --- sweeps: cached and exact -----------------------------------------------------------------------------

def test_cached_sweep_equals_full_traces_on_a_sample():
    sweeps = [parse_sweep(s) for s in ("embed_dim=96,192", "num_heads=3,6", "depth=1,3", "mlp_ratio=2,4",
                                       "pos_embed.name=learned,sincos2d,none")]
    variants = expand([TINY], sweeps, ["img_size=64"])
    cached = run(variants)  # one cache for the whole sweep
    for i in range(0, len(variants), 7):  # a sample, traced whole and alone
        full = analyze(variants[i].spec, method="full", name=variants[i].name)
        a, b = cached[i].to_dict(), full.to_dict()
        for key in ("derived", "derivation", "method"):
            a.pop(key), b.pop(key)
        assert a == b, variants[i].name
    assert all(r.derived for r in cached)
