"""Measured cost of one variant: median inference and training-step time and peak memory, each
variant in a fresh interpreter so one variant's allocator state cannot distort the next.

Parent side: :func:`measure_spec` starts ``python -m vitlab.measure`` with the spec as JSON and
reads one JSON line back; when the child runs out of memory (an exception, or the kernel's OOM
killer ending it) the batch is halved and the result says so (``halved_from``).

Child side (``main``): build the model, warm up, time ``repeats`` runs, report the median.

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
import time
from typing import Any

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


def _timed(step, device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``step()`` after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


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


def run_child(spec_json: str, batch_size: int, device: str, phases: list[str], warmup: int, repeats: int,
              dtype: str, threads: int | None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from .analysis.memory import DTYPES
    from .model import build_model
    from .spec import ViTSpec

    if threads:
        torch.set_num_threads(threads)
    spec = ViTSpec.model_validate(json.loads(spec_json))
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

        out["infer_ms"] = _timed(infer, dev, warmup, repeats)
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

        out["train_step_ms"] = _timed(train, dev, warmup, repeats)
        out["train_peak_bytes"] = peak()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitlab.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec-json", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--phases", default="infer,train")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    try:
        result = run_child(a.spec_json, a.batch_size, a.device, a.phases.split(","), a.warmup, a.repeats, a.dtype,
                           a.threads)
    except Exception as exc:  # noqa: BLE001  (reported to the parent as one JSON line)
        oom = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "oom": oom}
    print(json.dumps(result), flush=True)


# --- parent ----------------------------------------------------------------------------------------------

def _child(spec_json: str, batch_size: int, device: str, phases: str, warmup: int, repeats: int, dtype: str,
           threads: int | None, timeout: float | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "vitlab.measure", "--spec-json", spec_json, "--batch-size", str(batch_size),
           "--device", device, "--phases", phases, "--warmup", str(warmup), "--repeats", str(repeats),
           "--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode in (-9, 137) and not lines:  # SIGKILL: the kernel's out-of-memory killer
        return {"error": "killed (out of memory)", "oom": True}
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1], "oom": False}
    return json.loads(lines[-1])


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
    if batch != asked:
        measured["halved_from"] = asked
        measured["note"] = f"out of memory at batch {asked}: measured at batch {batch}"
    return measured


if __name__ == "__main__":
    main()
