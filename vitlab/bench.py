"""Throughput of a model and how close it gets to the machine's matmul limit.

Efficiency = achieved multiply-adds per second (FLOPs from vitlab's own count, fvcore convention:
one MAC = 1) / multiply-adds per second of a large square matmul measured in the same run.
A training step is counted as 3x the forward MACs (forward, input gradients, weight gradients).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .timing import median_seconds


def matmul_macs_per_s(n: int = 2048, dtype=torch.float32, device="cpu", iters: int = 5) -> float:
    """Multiply-adds per second of an (n x n) @ (n x n) matmul: n**3 MACs per call."""
    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return n**3 / median_seconds(lambda: a @ b, device, warmup=2, repeats=iters)


@dataclass
class BenchResult:
    name: str
    mode: str  # "inference" or "train"
    batch_size: int
    compiled: bool
    device: str
    seconds_per_step: float
    images_per_s: float
    macs_per_image: int  # forward MACs of one image (vitlab's count)
    achieved_gmacs: float  # GMAC/s achieved (x3 forward MACs for a training step)
    matmul_gmacs: float  # GMAC/s of a large square matmul in the same run
    efficiency: float  # achieved / matmul

    def to_dict(self) -> dict:
        return asdict(self)


def bench_model(
    model: torch.nn.Module,
    macs_per_image: int,
    *,
    batch_size: int = 8,
    train: bool = False,
    compile: bool = False,
    device="cpu",
    iters: int = 5,
    name: str = "",
    matmul_size: int = 2048,
) -> BenchResult:
    """Time inference (``torch.inference_mode``) or a training step (forward, backward, SGD)."""
    device = torch.device(device)
    model = model.to(device)
    spec = getattr(model, "spec", None)
    img = spec.img_hw if spec is not None else (224, 224)
    x = torch.randn(batch_size, 3, *img, device=device)
    run = torch.compile(model) if compile else model
    if train:
        model.train()
        y = torch.randint(0, max(getattr(spec, "num_classes", 1), 1), (batch_size,), device=device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(run(x), y).backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                run(x)
    seconds = median_seconds(step, device, warmup=3 if compile else 2, repeats=iters)
    peak = matmul_macs_per_s(matmul_size, device=device)
    macs = macs_per_image * batch_size * (3 if train else 1)
    achieved = macs / seconds
    return BenchResult(
        name=name or getattr(spec, "name", type(model).__name__), mode="train" if train else "inference",
        batch_size=batch_size, compiled=compile, device=str(device), seconds_per_step=seconds,
        images_per_s=batch_size / seconds, macs_per_image=int(macs_per_image),
        achieved_gmacs=achieved / 1e9, matmul_gmacs=peak / 1e9, efficiency=achieved / peak,
    )
