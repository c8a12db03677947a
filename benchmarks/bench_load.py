"""Loading timm weights from a local safetensors file: ``vitlab.load_timm_weights`` into the
matching spec against timm's own ``load_state_dict`` of the same file (``safetensors.torch.load_file``
then ``model.load_state_dict``). fp32, CPU, alternating runs in one process, warm page cache.
Prints the time ratio vitlab / timm (target <= 1.5).

The file is written into a temporary folder from a ``pretrained=False`` model (random weights);
nothing is downloaded.

    .venv/bin/python benchmarks/bench_load.py [--model vit_large_patch16_224] [--rounds 6]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vitlab.timing import alternate  # noqa: E402

import vitlab  # noqa: E402


def _filled(module: torch.nn.Module) -> torch.nn.Module:
    """Allocate a meta-built model and fill it with cheap random values (init is not measured)."""
    module = module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_large_patch16_224", help="timm model name")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()

    import timm
    from safetensors.torch import load_file, save_file

    spec = vitlab.spec_from_timm(args.model)
    theirs = _filled(timm.create_model(args.model, pretrained=False, device="meta"))
    ours = _filled(vitlab.build_model(spec, device="meta"))
    n_params = sum(p.numel() for p in theirs.parameters())

    with tempfile.TemporaryDirectory(prefix="vitlab-bench-") as tmp:
        path = Path(tmp) / f"{args.model}.safetensors"
        save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
        size_gb = path.stat().st_size / 1e9

        def timm_load():
            theirs.load_state_dict(load_file(str(path)), strict=True)

        def vitlab_load():
            vitlab.load_timm_weights(ours, path, strict=True)

        start = time.perf_counter()
        report = vitlab.load_timm_weights(ours, path, strict=True)
        first = time.perf_counter() - start
        assert report.ok, report
        r = alternate(vitlab_load, timm_load, warmup=1, rounds=args.rounds)

        x = torch.randn(1, 3, *spec.img_hw)
        with torch.inference_mode():
            diff = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()

    print(f"{args.model}: {n_params / 1e6:.0f}M parameters, {size_gb:.2f} GB safetensors, fp32 CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}")
    print(f"first load {first:.2f} s; medians vitlab {r['a_median_s']:.3f} s, timm {r['b_median_s']:.3f} s; "
          f"outputs max |diff| {diff:.2e}")
    print(f"load time ratio vitlab/timm: {r['ratio']:.3f} (median of per-round ratios {r['pair_ratio_median']:.3f}; "
          "target <= 1.50)")


if __name__ == "__main__":
    main()
