"""Performance harness (issue 7): vitlab against timm's VisionTransformer of the same configuration,
alternating runs in one process, plus efficiency against a large matmul, torch.compile speed-up
and CLI start-up. Prints a Markdown report (paste into benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/bench_perf.py [--quick] [--no-compile] [--no-startup]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vitlab.timing import alternate  # noqa: E402

import vitlab  # noqa: E402
from vitlab.bench import matmul_macs_per_s  # noqa: E402

CASES = [("vit_tiny_patch16_224", 32), ("vit_base_patch16_224", 8)]


def _step(model, x, y, train: bool):
    if not train:
        def infer():
            with torch.inference_mode():
                model(x)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def compare_case(name: str, batch: int, train: bool, rounds: int, peak: float) -> dict:
    import timm

    spec = vitlab.load_spec(name)
    ours = vitlab.build_model(spec, seed=0).train(train)
    theirs = timm.create_model(name, pretrained=False).train(train)
    x = torch.randn(batch, 3, *spec.img_hw)
    y = torch.randint(0, spec.num_classes, (batch,))
    r = alternate(_step(ours, x, y, train), _step(theirs, x, y, train), warmup=2, rounds=rounds)
    macs = vitlab.analyze(spec).flops * batch * (3 if train else 1)
    return {
        "model": name, "mode": "train" if train else "inference", "batch": batch,
        "ratio": r["ratio"], "ours_eff": macs / r["a_median_s"] / peak, "timm_eff": macs / r["b_median_s"] / peak,
        "ours_ips": batch / r["a_median_s"], "timm_ips": batch / r["b_median_s"],
    }


def compile_case(name: str, batch: int, rounds: int) -> dict:
    spec = vitlab.load_spec(name)
    model = vitlab.build_model(spec, seed=0).eval()
    compiled = torch.compile(model)
    x = torch.randn(batch, 3, *spec.img_hw)

    def run(m):
        def f():
            with torch.inference_mode():
                m(x)
        return f
    r = alternate(run(compiled), run(model), warmup=3, rounds=rounds)
    return {"model": name, "batch": batch, "compiled_over_eager": r["ratio"], "speedup": 1 / r["ratio"]}


def startup(rounds: int) -> dict:
    vitlab_cmd = [sys.executable, "-m", "vitlab", "components"]
    torch_cmd = [sys.executable, "-c", "import torch"]
    a, b = [], []
    for i in range(rounds):
        for cmd, sink in ((vitlab_cmd, a), (torch_cmd, b)) if i % 2 == 0 else ((torch_cmd, b), (vitlab_cmd, a)):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            sink.append(time.perf_counter() - start)
    return {"ratio": statistics.median(a) / statistics.median(b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-startup", action="store_true")
    args = ap.parse_args()
    rounds = 4 if args.quick else 10
    import timm

    peak = matmul_macs_per_s(2048)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads; "
          f"2048^3 fp32 matmul: {peak / 1e9:.1f} GMAC/s\n")
    print("| model | mode | batch | vitlab/timm time | vitlab efficiency | timm efficiency |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, batch in CASES:
        for train in (False, True):
            r = compare_case(name, batch, train, rounds, peak)
            print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['ratio']:.3f} | {r['ours_eff']:.2f} | {r['timm_eff']:.2f} |", flush=True)
    if not args.no_compile:
        print("\n| model | batch | torch.compile speed-up (eager / compiled time) |")
        print("| --- | --- | --- |")
        for name, batch in CASES:
            r = compile_case(name, batch, max(3, rounds // 2))
            print(f"| {r['model']} | {r['batch']} | {r['speedup']:.2f}x |", flush=True)
    if not args.no_startup:
        r = startup(max(4, rounds // 2))
        print(f"\nstart-up: `vitlab components` / `python -c 'import torch'` = {r['ratio']:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
