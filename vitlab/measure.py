"""Measured cost of one variant: median inference and training-step time and peak memory, each
variant in a fresh interpreter so one variant's allocator state cannot distort the next.

Parent side: :func:`measure_spec` starts ``python -m vitlab.measure`` with the spec as JSON and
reads one JSON line back; when the child runs out of memory (an exception, or the kernel's OOM
killer ending it) the batch is halved and the result says so (``halved_from``).

Child side (``main``): build the model, warm up, time ``repeats`` runs (``vitlab.timing``), report the median.

* CUDA: CUDA events for time, ``torch.cuda.max_memory_allocated`` (reset between phases) for peaks.
* CPU: ``time.perf_counter``; peak = the process's peak resident set (``VmHWM``) minus its resident
  set just before the model is built. The peak is reset between inference and training by writing
  ``5`` to ``/proc/self/clear_refs``; where that is refused, inference and training are measured in
  separate children.

The training step is forward, cross-entropy, backward and AdamW (its moments count in the peak).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from .errors import is_out_of_memory
from .timing import call_times

MEASURED_KEYS = ("device", "batch_size", "infer_ms", "train_step_ms", "infer_peak_bytes", "train_peak_bytes")


# --- child -----------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's peak resident set (Linux >= 4.0); False where it is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_bytes() -> int:
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else _rss_peak_bytes()


def _warm_runtime(device, dtype) -> None:
    """One small training step through the operators a ViT uses, before the baseline: torch's
    one-time start-up (thread pools, kernel code, the autograd engine's threads) is then not
    charged to the variant."""
    import torch
    import torch.nn.functional as F

    conv = torch.nn.Conv2d(3, 16, 4, stride=4, device=device, dtype=dtype)
    lin = torch.nn.Linear(16, 48, device=device, dtype=dtype)
    opt = torch.optim.AdamW(list(conv.parameters()) + list(lin.parameters()))
    x = conv(torch.randn(2, 3, 16, 16, device=device, dtype=dtype)).flatten(2).transpose(1, 2)  # (2, 16, 16)
    q, k, v = lin(F.layer_norm(x, (16,))).reshape(2, 16, 3, 1, 16).permute(2, 0, 3, 1, 4)
    y = F.gelu(F.scaled_dot_product_attention(q, k, v)).mean(1)
    F.cross_entropy(y.reshape(2, -1).float(), torch.zeros(2, dtype=torch.long, device=device)).backward()
    opt.step()
    with torch.inference_mode():
        conv(torch.randn(2, 3, 16, 16, device=device, dtype=dtype))


def _milliseconds(key: str, seconds: list[float]) -> dict[str, float]:
    """``{key: median ms, key_spread: (slowest - fastest) / median in %}``: the spread says how far
    one run's median can be trusted (a busy machine widens it)."""
    ms = sorted(1000 * t for t in seconds)
    median = statistics.median(ms)
    return {key: median, f"{key}_spread": round(100 * (ms[-1] - ms[0]) / median, 1) if median else 0.0}


def run_child(spec_json: str, batch_size: int, device: str, phases: list[str], warmup: int, repeats: int,
              dtype: str, threads: int | None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from .analysis.memory import DTYPES
    from .recipes import build_model, load_spec

    if threads:
        torch.set_num_threads(threads)
    spec = load_spec(json.loads(spec_json))
    dev = torch.device(device)
    dt = DTYPES[dtype]
    out: dict[str, Any] = {"device": str(dev), "batch_size": batch_size}
    cuda = dev.type == "cuda"
    _warm_runtime(dev, dt)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        _reset_peak()
        base = _rss_bytes()
    model = build_model(spec, device=dev, dtype=dt, seed=0)
    H, W = spec.img_hw
    x = torch.randn(batch_size, spec.in_chans, H, W, device=dev, dtype=dt)

    def peak() -> int:
        if cuda:
            return torch.cuda.max_memory_allocated(dev) - base
        return _rss_peak_bytes() - base

    if "infer" in phases:
        model.eval()

        def infer():
            with torch.inference_mode():
                model(x)

        out.update(_milliseconds("infer_ms", call_times(infer, dev, warmup=warmup, repeats=repeats)))
        out["infer_peak_bytes"] = peak()
    if "train" in phases:
        if "infer" in phases:  # a fresh peak for training (the model's weights stay in the baseline's count)
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            elif not _reset_peak():
                raise RuntimeError("cannot reset the peak resident set: measure phases in separate processes")
        model.train()
        y = torch.randint(0, max(spec.num_classes, 1), (batch_size,), device=dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train():
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y) if spec.num_classes else logits.float().mean()
            loss.backward()
            opt.step()

        out.update(_milliseconds("train_step_ms", call_times(train, dev, warmup=warmup, repeats=repeats)))
        out["train_peak_bytes"] = peak()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitlab.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec-json", required=True, help="the spec as JSON, or - to read it from stdin")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--phases", default="infer,train")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    spec_json = sys.stdin.read() if a.spec_json == "-" else a.spec_json  # stdin: no argv length limit
    try:
        result = run_child(spec_json, a.batch_size, a.device, a.phases.split(","), a.warmup, a.repeats, a.dtype,
                           a.threads)
    except Exception as exc:  # noqa: BLE001  (reported to the parent as one JSON line)
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "oom": is_out_of_memory(exc)}
    print(json.dumps(result), flush=True)


# --- parent ----------------------------------------------------------------------------------------------

def _child(spec_json: str, batch_size: int, device: str, phases: str, warmup: int, repeats: int, dtype: str,
           threads: int | None, timeout: float | None) -> dict[str, Any]:
    # the spec goes through stdin: a long spec (many layers) overflowed the argument list
    cmd = [sys.executable, "-m", "vitlab.measure", "--spec-json", "-", "--batch-size", str(batch_size),
           "--device", device, "--phases", phases, "--warmup", str(warmup), "--repeats", str(repeats),
           "--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    returncode, stdout, stderr = _run_in_own_group(cmd, spec_json, timeout)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode in (-9, 137) and not lines:  # SIGKILL: the kernel's out-of-memory killer
        return {"error": "killed (out of memory)", "oom": True}
    if not lines:
        last = (stderr.strip().splitlines() or [f"exit {returncode}"])[-1]
        return {"error": last, "oom": is_out_of_memory(last)}
    return json.loads(lines[-1])


def _run_in_own_group(cmd: list[str], stdin: str, timeout: float | None) -> tuple[int, str, str]:
    """Run the measuring child in a process group of its own, and end that group whenever this
    call is left early: a timeout, Ctrl-C, or SIGTERM to this process (turned into SystemExit here,
    so the ``finally`` runs) would otherwise leave the child running, orphaned."""
    import signal
    import threading

    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def on_sigterm(signum, frame):
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        stdout, stderr = proc.communicate(stdin, timeout=timeout)
        return proc.returncode, stdout, stderr
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def can_reset_peak() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


def measure_spec(spec, batch_size: int, *, device: str | None = None, warmup: int = 3, repeats: int = 5,
                 dtype: str = "fp32", threads: int | None = None, timeout: float | None = None) -> dict[str, Any]:
    """``measured`` of one spec: ``{device, batch_size, infer_ms, train_step_ms, infer_peak_bytes,
    train_peak_bytes}`` (plus ``halved_from`` and ``note`` when out-of-memory halved the batch).

    Raises:
        VitlabError: the child failed for another reason than memory, or even batch 1 did not fit.
    """
    from .errors import VitlabError

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    spec_json = spec.model_dump_json() if hasattr(spec, "model_dump_json") else json.dumps(spec)
    asked, batch = batch_size, batch_size
    together = device.startswith("cuda") or can_reset_peak()
    while True:
        if together:
            result = _child(spec_json, batch, device, "infer,train", warmup, repeats, dtype, threads, timeout)
        else:
            result = _child(spec_json, batch, device, "infer", warmup, repeats, dtype, threads, timeout)
            if "error" not in result:
                train = _child(spec_json, batch, device, "train", warmup, repeats, dtype, threads, timeout)
                result = train if "error" in train else {**result, **{k: train[k] for k in ("train_step_ms", "train_peak_bytes")}}
        if "error" not in result:
            break
        if not result.get("oom") or batch == 1:
            name = getattr(spec, "name", "the variant")
            raise VitlabError(f"measuring {name} at batch {batch} failed: {result['error']}")
        batch //= 2
    measured = {k: result[k] for k in MEASURED_KEYS}
    measured.update({k: result[k] for k in ("infer_ms_spread", "train_step_ms_spread") if k in result})
    if batch != asked:
        measured["halved_from"] = asked
        measured["note"] = f"out of memory at batch {asked}: measured at batch {batch}"
    if (warning := noisy(measured)) is not None:
        measured["warning"] = warning
    return measured


NOISY_SPREAD = 50.0  # % of the median between the slowest and fastest run


def noisy(measured: dict[str, Any]) -> str | None:
    """Why a measurement should not be trusted, or ``None``: runs that differ by more than
    ``NOISY_SPREAD`` % of their median, or an inference slower than a whole training step (which
    runs that inference and more): both a sign of a busy machine."""
    spread = {k: measured.get(f"{k}_spread") for k in ("infer_ms", "train_step_ms")}
    wide = [f"{k.replace('_ms', '')} runs spread {v:g}%" for k, v in spread.items() if v and v > NOISY_SPREAD]
    infer, train = measured.get("infer_ms"), measured.get("train_step_ms")
    if infer is not None and train is not None and infer > train:
        wide.append(f"inference ({infer:.1f} ms) slower than a training step ({train:.1f} ms)")
    if not wide:
        return None
    return "unreliable timing: " + "; ".join(wide) + " (a busy machine? measure again with more --repeats)"


def check_device(device: str):
    """The ``torch.device`` to time on, or one line refusing it: ``meta`` computes nothing, and a
    device this machine does not have (``cuda`` without a GPU) fails a tiny allocation."""
    import torch

    from .errors import VitlabError

    kind = str(device).split(":", 1)[0]
    if kind == "meta":
        raise VitlabError("--device meta: the meta device computes nothing, so there is no time or memory to "
                          "measure; use cpu or cuda")
    if kind not in ("cpu", "cuda", "mps", "xpu"):
        raise VitlabError(f"--device {device}: expected cpu, cuda, cuda:N, mps or xpu")
    try:
        torch_device = torch.device(device)
        torch.empty(0, device=torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise VitlabError(f"--device {device}: {exc}") from None
    return torch_device


if __name__ == "__main__":
    main()
