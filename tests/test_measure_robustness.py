"""``--measure`` on bad or hostile input: no time reported for the meta device, any spec size through
the child, any allocator's wording of out-of-memory, no orphaned child after SIGTERM, and a warning
when the timings cannot be trusted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import vitlab
import vitlab.measure as measure
from vitlab.errors import VitlabError

from conftest import TINY, invoke_cli, one_error, subprocess_env


@pytest.mark.parametrize("args", [["compare", "vit_tiny_patch16_224", "--measure", "--device", "meta"],
                                  ["bench", "vit_tiny_patch16_224", "--measure", "--device", "meta"]])
def test_the_meta_device_is_refused(args):
    assert "the meta device computes nothing" in one_error(invoke_cli(*args, "--set", "depth=1"))


def test_a_spec_longer_than_an_argument_goes_through_stdin():
    """A spec of 3,000 ``layers`` entries is ~400 KB of JSON: one argv string may be 128 KB."""
    layers = [{"at": 0, "attention": {"name": "mhsa", "params": {"qkv_bias": True}}, "mlp_ratio": 2.0}] * 3000
    spec = vitlab.load_spec({**TINY, "depth": 1, "layers": layers})
    assert len(spec.model_dump_json()) > 2**17
    measured = measure.measure_spec(spec, 1, device="cpu", warmup=0, repeats=2)
    assert measured["infer_ms"] > 0 and measured["train_step_ms"] > 0
    assert measured["infer_ms_spread"] >= 0 and measured["train_step_ms_spread"] >= 0


@pytest.mark.parametrize("message", ["[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory",
                                     "[Errno 12] Cannot allocate memory", "CUDA out of memory"])
def test_the_child_reports_any_allocation_failure_as_out_of_memory(monkeypatch, capsys, message):
    def fails(*a, **k):
        raise RuntimeError(message)

    monkeypatch.setattr(measure, "run_child", fails)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("{}"))
    measure.main(["--spec-json", "-", "--batch-size", "4"])
    assert json.loads(capsys.readouterr().out)["oom"] is True


def test_sigterm_to_the_parent_ends_the_measuring_child(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"""
import subprocess, vitlab, vitlab.measure as m
real = subprocess.Popen
def spy(*a, **k):
    p = real(*a, **k)
    if "vitlab.measure" in a[0]:  # not another program the libraries start (uname)
        open({str(pid_file)!r}, "w").write(str(p.pid))
    return p
m.subprocess.Popen = spy
spec = vitlab.load_spec({TINY!r})
m.measure_spec(spec, 1, device="cpu", warmup=0, repeats=10**7)  # would run for hours
"""
    parent = subprocess.Popen([sys.executable, "-c", script], env=subprocess_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the child never started"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    time.sleep(0.5)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # reaped by the parent before it exited; give the kernel a moment
            os.kill(child, 0)
            time.sleep(0.1)


@pytest.mark.parametrize("measured, says", [
    ({"infer_ms": 10.0, "train_step_ms": 30.0, "infer_ms_spread": 5.0, "train_step_ms_spread": 80.0}, "train_step runs spread 80%"),
    ({"infer_ms": 4439.0, "train_step_ms": 2322.0}, "inference (4439.0 ms) slower than a training step (2322.0 ms)"),
])
def test_untrustworthy_timings_are_flagged(measured, says):
    assert says in measure.noisy(measured)
    assert measure.noisy({"infer_ms": 10.0, "train_step_ms": 30.0, "infer_ms_spread": 5.0}) is None
