"""Checkpoints in the original layouts timm converts when it loads them: OpenAI CLIP and open_clip,
DINOv2 / DINOv3, EVA, Perception Encoder, Sapiens2, BEiT-3, SAM, MobileCLIP, XCiT, RADIO and AIMv2
originals, and big_vision ``.npz``.

The conversion is the family's own timm code, never a second copy of it: the ``checkpoint_filter_fn``
of the module defining the spec's timm class (``timm_class(spec)``), run on a meta-device timm
model built from ``timm_kwargs(spec)`` (the filter only reads its shapes), or, for ``.npz``, that
class's own ``load_pretrained``. Nothing is downloaded and nothing in the file runs: a filter sees
plain tensors, and an ``.npz`` is read with ``allow_pickle=False`` after its headers are checked
against what the model can take.
"""
from __future__ import annotations

import importlib
import re
import zipfile
from pathlib import Path
from typing import Iterable

import torch

from ..errors import VitlabError, WeightsError
from ..fileio import check_input
from .sources import Source, from_mapping, from_module

# (layout, a key only its checkpoints have): names the layout in the report and decides that the
# family's filter must run; a checkpoint in timm's own names matches none of these
ORIGINAL_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("OpenAI CLIP", r"(module\.)?visual\.(class_embedding|conv1\.weight)$"),
    ("open_clip", r"(module\.)?visual\.(trunk\.)?(pos_embed|blocks\.0\.norm1\.weight)$"),
    ("Sapiens2", r"blocks\.0\.attn\.wq\.weight$"),
    ("DINOv3", r"storage_tokens$"),
    ("DINOv2", r"(mask_token|register_tokens)$"),
    ("Perception Encoder", r"conv1\.weight$"),
    ("BEiT-3", r"beit3\."),
    ("MobileCLIP", r"image_encoder\.model\.patch_emb\."),
    ("SAM", r"image_encoder\.patch_embed\.proj\.weight$"),
    ("XCiT original", r"pos_embeder\."),
    ("RADIO", r"radio_model\."),
    ("AIMv2", r"preprocessor\.patchifier\."),
)

# an .npz may hold up to this many times the model's float32 parameter bytes (EMA copies, optimizer
# targets), plus a little: anything its headers claim beyond that is refused before it is read
NPZ_BUDGET_FACTOR, NPZ_BUDGET_SLACK = 3, 64 << 20


def layout_of(keys: Iterable[str]) -> str | None:
    """The original layout these checkpoint keys are in, ``None`` for timm's own names."""
    keys = list(keys)
    for name, marker in ORIGINAL_LAYOUTS:
        rx = re.compile(marker)
        if any(rx.match(k) for k in keys):
            return name
    return None


def _timm_twin(model, why: str, device: str):
    """timm's model equivalent to the vitlab ``model`` (its class and a fresh instance)."""
    from .to_timm import timm_class, timm_kwargs

    try:
        registry = model.registry
        cls, kwargs = timm_class(model.spec, registry=registry), timm_kwargs(model.spec, registry=registry)
    except VitlabError as exc:
        raise WeightsError(f"{why} needs timm's equivalent of the spec, and there is none: {exc.lines()[0]}") from None
    with torch.device(device):
        return cls, cls(**kwargs)


def convert(model, src: Source) -> tuple[Source, str | None]:
    """``src`` in timm's names: converted by the family's ``checkpoint_filter_fn`` when its keys
    are in an original layout (the note says which), else unchanged."""
    layout = layout_of(src.keys())
    if layout is None:
        return src, None
    why = f"{src.label}: the {layout} layout"
    cls, twin = _timm_twin(model, why, "meta")
    module = importlib.import_module(cls.__module__)
    filt = getattr(module, "checkpoint_filter_fn", None)
    if filt is None:
        raise WeightsError(f"{why} cannot be converted: timm's {module.__name__} has no checkpoint filter")
    state = {k: src.get(k) for k in src.keys()}
    try:
        out = filt(state, twin)
    except Exception as exc:  # noqa: BLE001 - timm's filter on malformed data fails in many ways
        raise WeightsError(f"{why} could not be converted by timm's {module.__name__}.checkpoint_filter_fn "
                           f"({type(exc).__name__}: {exc})") from None
    note = f"checkpoint in the {layout} layout, converted by timm's {module.__name__}.checkpoint_filter_fn"
    return from_mapping(out, f"{src.label} ({layout} layout)"), note


def _npz_claims(path: Path) -> int:
    """Bytes the arrays of an ``.npz`` claim, read from their headers only.

    Raises:
        WeightsError: not a zip of ``.npy`` arrays, or an array of objects (pickles).
    """
    import numpy as np

    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = {(1, 0): np.lib.format.read_array_header_1_0}.get(version,
                                                                            np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f, max_header_size=10_000)
                if dtype.hasobject:
                    raise WeightsError(f"{path}: array '{info.filename}' holds Python objects (a pickle); "
                                       "only numeric arrays are read")
                if any(int(n) < 0 for n in shape):  # (-1, 10**9) would claim fewer bytes than it holds
                    raise WeightsError(f"{path}: array '{info.filename}' has a negative dimension {tuple(shape)}")
                count = 1
                for n in shape:
                    count *= int(n)
                total += count * dtype.itemsize
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad zip or header
        raise WeightsError(f"{path}: not a readable .npz archive of arrays ({type(exc).__name__}: {exc})") from None
    return total


def open_npz(model, path: str | Path) -> Source:
    """A big_vision ``.npz`` read by timm's own ``load_pretrained`` into timm's equivalent model,
    seen as that model's state dict."""
    path = check_input(path, "checkpoint", WeightsError)
    params = sum(p.numel() for p in model.parameters())
    budget = NPZ_BUDGET_FACTOR * 4 * params + NPZ_BUDGET_SLACK
    claimed = _npz_claims(path)
    if claimed > budget:
        raise WeightsError(f"{path}: its arrays claim {claimed} bytes, more than a checkpoint of this "
                           f"{params}-parameter model can hold ({budget}); refused before reading")
    cls, twin = _timm_twin(model, f"{path}: a big_vision .npz", "cpu")
    load = getattr(twin, "load_pretrained", None)
    if load is None:
        raise WeightsError(f"{path}: timm's {cls.__name__} does not read big_vision .npz checkpoints")
    try:
        with torch.no_grad():
            load(str(path))
    except Exception as exc:  # noqa: BLE001 - missing keys or shapes that do not fit
        raise WeightsError(f"{path}: timm's {cls.__name__}.load_pretrained could not read it "
                           f"({type(exc).__name__}: {exc})") from None
    src = from_module(twin)
    src.label = f"{path} (big_vision .npz)"
    src.note = f"big_vision .npz, read by timm's {cls.__module__}.{cls.__name__}.load_pretrained"
    return src
