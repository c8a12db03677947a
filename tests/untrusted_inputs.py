"""Inputs the untrusted-input tests build for themselves: a tiny model's tensors, a vitlab checkpoint
whose stored spec the test chooses, a tiny recipe file and a small image."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

import vitlab
from vitlab.images import procedural_image, save_png

TINY = {"name": "tiny", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 3}
QUICK = 10.0  # seconds: a generous bound; the refusals take milliseconds, the attacks minutes


def one_line(exc: BaseException) -> str:
    """``exc``'s message, which must be exactly one line."""
    text = str(exc)
    assert len(text.splitlines()) == 1, text
    return text


def tiny_tensors(changes: dict | None = None) -> dict[str, torch.Tensor]:
    model = vitlab.build_model({**TINY, **(changes or {})}, seed=0)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_checkpoint(path: Path, spec: dict | str, tensors: dict | None = None) -> Path:
    """A vitlab checkpoint at ``path`` storing ``spec`` (a mapping, or raw text) as its metadata."""
    text = spec if isinstance(spec, str) else json.dumps(spec)
    save_file(tensors if tensors is not None else tiny_tensors(), str(path),
              metadata={"format": "vitlab", "vitlab_spec": text})
    return path


def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def tiny_image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    save_png(procedural_image(32), path)
    return path
