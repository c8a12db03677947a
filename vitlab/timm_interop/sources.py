"""Reading weights without running code: safetensors files, ``torch.load(weights_only=True)``
pickles, in-memory state dicts and model instances, all seen through one small lazy interface."""
from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..errors import WeightsError
from ..fileio import check_input

PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
_WRAPPERS = ("state_dict", "model", "module")  # {"model": state_dict, "epoch": 3, ...}


class Source:
    """A checkpoint's tensors by name: shapes without reading, values on demand.

    ``pos_layout`` is ``(prefix rows, patch grid)`` of the position table when the source knows it
    (a timm model instance); for files it is inferred from shapes.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], getter: Callable[[str], torch.Tensor], label: str,
                 pos_layout: tuple[int, tuple[int, int]] | None = None):
        self.shapes = shapes
        self._get = getter
        self.label = label
        self.pos_layout = pos_layout
        self.note: str | None = None  # how the source was read, when the report should say so
        self.converted: dict[str, str] = {}  # key -> how a family's table converted it, for the report

    def replaced(self, shapes: dict[str, tuple[int, ...]], getter: Callable[[str], torch.Tensor], *,
                 label: str | None = None, pos_layout=None, converted: dict[str, str] | None = None) -> "Source":
        """A source of other tensors standing for this one (its label, layout and notes unless given)."""
        out = Source(shapes, getter, self.label if label is None else label, pos_layout or self.pos_layout)
        out.note = self.note
        out.converted = dict(self.converted if converted is None else converted)
        return out

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)


def _check_tensors(sd: Mapping[str, Any], label: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{label}: expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    if not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in _WRAPPERS:  # a training checkpoint that wraps the state dict
            if isinstance(sd.get(key), Mapping):
                return _check_tensors(sd[key], f"{label}[{key!r}]")
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise WeightsError(f"{label}: key {k!r} is not a string")
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{label}: entry '{k}' is a {type(v).__name__}, not a tensor")
        if v.is_meta:
            raise WeightsError(f"{label}: entry '{k}' is on the meta device (a model built without weights)")
        out[k] = v
    if not out:
        raise WeightsError(f"{label}: no tensors in the checkpoint")
    return out


def from_mapping(sd: Mapping[str, Any], label: str = "state dict", pos_layout=None) -> Source:
    sd = _check_tensors(sd, label)
    return Source({k: tuple(v.shape) for k, v in sd.items()}, sd.__getitem__, label, pos_layout)


def from_module(model: nn.Module) -> Source:
    layout = None
    pe = getattr(model, "patch_embed", None)
    if hasattr(model, "no_embed_class") and hasattr(model, "num_prefix_tokens") and hasattr(pe, "grid_size"):
        # a timm VisionTransformer knows where its position table's patch rows start
        prefix = 0 if model.no_embed_class else int(model.num_prefix_tokens)
        layout = (prefix, tuple(int(g) for g in pe.grid_size))
    return from_mapping(model.state_dict(), f"{type(model).__name__} instance", layout)


def read_pickle(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only; a pickle that would
    import or call anything else is refused before it runs."""
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols are not the user's business
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise WeightsError(
            f"{path}: refused to load: the pickle would run code or build objects other than tensors ({why}); "
            "only plain state dicts are read (weights_only=True)"
        ) from None
    except Exception as exc:  # garbage or truncated data: the restricted unpickler fails in many ways
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def open_file(path: str | Path) -> Iterator[Source]:
    """A file source; safetensors are read tensor by tensor while the file stays open."""
    path = check_input(path, "checkpoint", WeightsError)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError, or a header that is not JSON
            raise WeightsError(f"{path}: not a valid safetensors file ({exc})") from None
        with handle as f:
            meta = f.metadata() or {}
            if meta.get("format") == "vitlab":
                raise WeightsError(f"{path}: a vitlab checkpoint (keys in vitlab's names); read it with vitlab.load")
            try:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as exc:
                raise WeightsError(f"{path}: unreadable tensor header ({exc})") from None
            if not shapes:
                raise WeightsError(f"{path}: no tensors in the checkpoint")

            def get(key: str) -> torch.Tensor:
                try:
                    return f.get_tensor(key)
                except Exception as exc:
                    raise WeightsError(f"{path}: cannot read tensor '{key}' ({exc})") from None

            yield Source(shapes, get, str(path))
        return
    if suffix in PICKLE_SUFFIXES:
        yield from_mapping(read_pickle(path), str(path))
        return
    raise WeightsError(f"{path}: unknown checkpoint format '{suffix}'; expected one of {', '.join(SUFFIXES)} "
                       "(or a big_vision .npz, read into a model by load_timm_weights)")


@contextlib.contextmanager
def open_source(source: Any) -> Iterator[Source]:
    """A timm model (or any module), a state dict, or a local file path."""
    if isinstance(source, (str, Path)):
        with open_file(source) as src:
            yield src
    elif isinstance(source, nn.Module):
        from ..model import VisionTransformer

        if isinstance(source, VisionTransformer):
            raise WeightsError("the source is a vitlab model: use model.load_state_dict, or vitlab.save / vitlab.load")
        yield from_module(source)
    elif isinstance(source, Mapping):
        yield from_mapping(source)
    else:
        raise WeightsError(
            f"cannot load weights from a {type(source).__name__}: pass a timm model, a state dict, or a "
            f"path to a {', '.join(SUFFIXES)} file"
        )
