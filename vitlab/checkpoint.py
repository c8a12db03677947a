"""Native checkpoints: safetensors with the spec in the metadata, so a file alone rebuilds the exact
model. Nothing in a checkpoint can run code."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


from .errors import SpecError, WeightsError

FORMAT = "vitlab"
SPEC_KEY = "vitlab_spec"


def save(model, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``model``'s weights and spec to a ``.safetensors`` file.

    The metadata holds ``{"format": "vitlab", "vitlab_spec": <spec JSON>}``. The file is written
    beside its destination and renamed into place, so an interrupted save leaves no half file.

    Raises:
        VitlabError: ``path`` exists (pass ``force=True`` to overwrite) or its folder does not.
    """
    from safetensors.torch import save_file

    from .fileio import atomic_write
    from .model import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"vitlab.save saves a vitlab VisionTransformer, got {type(model).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, SPEC_KEY: json.dumps(model.spec.to_dict(), sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), force=force)


def is_vitlab_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written by ``vitlab.save`` (reads the header only)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return meta.get("format") == FORMAT and SPEC_KEY in meta


def read_spec(path: str | os.PathLike):
    """The ``ViTSpec`` stored in a vitlab checkpoint, without reading its tensors."""
    return _open(Path(path))[0]


def _open(path: Path):
    from safetensors import safe_open

    from .recipes import load_spec

    if not path.is_file():
        raise WeightsError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise WeightsError(f"{path}: not a valid safetensors file ({exc})") from None
    if meta.get("format") != FORMAT or SPEC_KEY not in meta:
        raise WeightsError(
            f"{path}: not a vitlab checkpoint (no '{SPEC_KEY}' metadata); "
            "load timm or other weights into a built model with vitlab.load_timm_weights"
        )
    try:
        data = json.loads(meta[SPEC_KEY])
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: the stored spec is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: the stored spec is not a mapping")
    try:
        spec = load_spec(data)
    except SpecError as exc:
        raise exc.with_source(str(path)) from None
    return spec, meta


def load(path: str | os.PathLike, device: Any = None, dtype: Any = None):
    """Rebuild the model saved by ``vitlab.save``: its spec from the metadata, then its weights.

    The model comes back in training mode, as ``build_model`` makes it; call ``.eval()`` for
    inference.

    Raises:
        WeightsError: not a vitlab checkpoint, unreadable, or weights that do not fit the spec.
        SpecError: the stored spec does not validate (e.g. a plugin component is not installed).
    """
    from safetensors.torch import load_file

    from .model import build_model

    path = Path(path)
    spec, _ = _open(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read the tensors ({exc})") from None
    model = build_model(spec, device="meta")  # no allocation, no init: every weight comes from the file
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs spec {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    mismatched += [f"{k}: file dtype {state[k].dtype}, not floating point" for k, v in expected.items()
                   if k in state and v.is_floating_point() and not state[k].is_floating_point()]
    if missing or unexpected or mismatched:
        lines = [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]
        lines += [f"shape mismatch: {m}" for m in mismatched]
        raise WeightsError(f"{path}: the weights do not fit the stored spec '{spec.name}':\n" + "\n".join(lines))
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model, spec)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _materialize_buffers(model, spec) -> None:
    """Non-persistent buffers (fixed tables such as sincos2d) are functions of the spec: rebuild
    them on the CPU instead of reading them from the file."""
    meta_buffers = [name for name, b in model.named_buffers() if b.is_meta]
    if not meta_buffers:
        return
    from .model import build_model

    fresh = dict(build_model(spec, device="cpu").named_buffers())
    for name in meta_buffers:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._buffers[attr] = fresh[name]
