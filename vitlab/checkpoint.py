"""Native checkpoints: safetensors with the spec in the metadata, so a file alone rebuilds the exact
model. Nothing in a checkpoint can run code.

A checkpoint is untrusted data: its spec may not name other files, and every size the spec claims
is checked against the tensor shapes in the file's header before anything is built or read.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import Problem, SpecError, WeightsError, path_label

FORMAT = "vitlab"
SPEC_KEY = "vitlab_spec"
# A stored spec is a few KB of JSON; metadata far beyond that was written to exhaust the parser.
MAX_SPEC_CHARS = 1 << 20
# Each block costs ~100 KB of Python objects to build even on the meta device, so a header that
# lists a million empty block tensors would cost GBs; published ViTs have at most ~100 blocks.
MAX_BLOCKS = 1024
# Tables a component computes from the spec alone (sincos2d positions) have no tensor in the file to
# check them against: they may hold as many values as the file's weights, or this many.
MAX_DERIVED_VALUES = 1 << 24

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")  # blocks are numbered globally, whatever their stages
_SIZE_FIELDS = ("depth", "embed_dim", "reg_tokens", "num_classes")  # checked against the tensor shapes


@dataclass(frozen=True)
class _Header:
    """What a safetensors header says, read without any tensor data."""

    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors names: F32, BF16, I64, ...

    @property
    def values(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def save(model, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``model``'s weights and spec to a ``.safetensors`` file.

    The metadata holds ``{"format": "vitlab", "vitlab_spec": <spec JSON>}``. The file is written
    beside its destination and renamed into place, so an interrupted save leaves no half file.

    Raises:
        VitlabError: ``path`` exists (pass ``force=True`` to overwrite) or its folder does not.
    """
    from safetensors.torch import save_file

    from .fileio import atomic_write, check_output
    from .model import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"vitlab.save saves a vitlab VisionTransformer, got {type(model).__name__}")
    check_output(path, force, "force=True")  # before copying the weights to the CPU
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, SPEC_KEY: json.dumps(model.spec.to_dict(), sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), force=force,
                        force_hint="force=True")


def is_vitlab_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written by ``vitlab.save`` (reads the header only)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not os.path.isfile(path):
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return meta.get("format") == FORMAT and SPEC_KEY in meta


def read_spec(path: str | os.PathLike):
    """The ``ViTSpec`` stored in a vitlab checkpoint, checked against the tensor shapes in the
    header, without reading any tensor data."""
    return _open(Path(path))[0]


def _open(path: Path):
    """The checked spec and the header. The sizes the spec states are compared with the tensor
    shapes twice: as written, before validation (validating may itself loop over the blocks), and
    once validated (defaults and sizes that follow from others)."""
    label = path_label(path)
    if not os.path.isfile(path):  # os.path: False, not an exception, for a name too long
        raise WeightsError(f"{label}: no such file" if not os.path.lexists(path) else f"{label}: not a file")
    header = _read_header(path)
    data = _stored_data(path, header.metadata)
    stated = _size_problems(_stated_sizes(data), header)
    if stated and not _describable(stated, data.get("depth")):
        raise _size_error(label, stated)
    spec = _validated(data, label)
    problems = _size_problems(_spec_sizes(spec), header)
    problems = problems or _derived_problems(spec, header)  # the tables follow sizes checked just now
    if problems:
        detail = _fit_lines(_meta_state(spec), header) if _describable(problems, spec.depth) else []
        raise _size_error(label, problems, detail)
    return spec, header


def _read_header(path: Path) -> _Header:
    """Metadata, shapes and dtypes. safetensors refuses a header whose sizes do not match the file
    (offsets past its end, a header length beyond it), so no shape here claims absent data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return _Header(
                metadata=f.metadata() or {},
                shapes={k: tuple(s.get_shape()) for k, s in slices.items()},
                dtypes={k: s.get_dtype() for k, s in slices.items()},
            )
    except Exception as exc:
        raise WeightsError(f"{path_label(path)}: not a valid safetensors file ({exc})") from None


def _stored_data(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    """The stored spec as raw data, parsed within the recipe parser's limits."""
    from .parsing import load_json

    label = path_label(path)
    text = meta.get(SPEC_KEY)
    if meta.get("format") != FORMAT or text is None:
        raise WeightsError(
            f"{label}: not a vitlab checkpoint (no '{SPEC_KEY}' metadata); "
            "load timm or other weights into a built model with vitlab.load_timm_weights"
        )
    if len(text) > MAX_SPEC_CHARS:
        raise WeightsError(f"{label}: {SPEC_KEY} is {len(text):,} characters; a stored spec is at most {MAX_SPEC_CHARS:,}")
    try:
        data = load_json(text)  # nesting, repeated keys, huge integers
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{label}: the stored spec is not valid JSON ({exc.msg})") from None
    except SpecError as exc:
        raise _in_stored_spec(exc, label) from None
    if not isinstance(data, dict):
        raise WeightsError(f"{label}: the stored spec is not a mapping")
    return data


def _validated(data: dict[str, Any], label: str):
    from .recipes import load_spec

    try:
        return load_spec(data, files=False)  # an untrusted spec never opens a file it names
    except SpecError as exc:
        raise _in_stored_spec(exc, label) from None


def _in_stored_spec(exc: SpecError, label: str) -> SpecError:
    """``m.safetensors: vitlab_spec.extends: ...``: the file, then the field inside its metadata."""
    problems = [Problem(f"{SPEC_KEY}.{p.loc}" if p.loc else SPEC_KEY, p.msg) for p in exc.problems]
    return SpecError(problems, source=label)


def _size_error(label: str, problems: list[tuple[str, str]], detail: list[str] = ()) -> WeightsError:
    return WeightsError("\n".join([f"{label}: {SPEC_KEY}.{field} {msg}" for field, msg in problems] + list(detail)))


def _describable(problems: list[tuple[str, str]], depth: Any) -> bool:
    """Only a depth that is wrong but small: then building the spec on meta is cheap, and the
    tensors it expects tell which blocks are missing or extra."""
    return [f for f, _ in problems] == ["depth"] and _is_int(depth) and depth <= MAX_BLOCKS


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stated_sizes(data: dict[str, Any]) -> dict[str, int]:
    """The sizes the raw spec states as integers (validation refuses other types later). Staged
    specs number their blocks globally, so the stages' depths add up to the block count; the
    tokens (class, registers) have the first stage's width, the final norm and head the last's."""
    sizes = {f: data[f] for f in _SIZE_FIELDS if _is_int(data.get(f))}
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(st, dict) for st in stages):
        if "embed_dim" in sizes:
            sizes["token_dim"] = sizes["embed_dim"]
        return sizes
    if all(_is_int(st.get("depth")) for st in stages):
        sizes["stages"] = sum(st["depth"] for st in stages)
    if _is_int(stages[0].get("embed_dim")):
        sizes["token_dim"] = stages[0]["embed_dim"]
    return sizes


def _spec_sizes(spec) -> dict[str, int]:
    sizes = {f: getattr(spec, f) for f in _SIZE_FIELDS}
    stages = getattr(spec, "stages", None)
    sizes["token_dim"] = stages[0].embed_dim if stages else spec.embed_dim
    return sizes


_HEAD_KEY = re.compile(r"head(_dist)?\.(.+\.)?weight$")  # a classifier's weights, under the head


def _size_problems(sizes: dict[str, int], header: _Header) -> list[tuple[str, str]]:
    """(field, problem) for each stated size that the tensor shapes contradict, found before
    anything is built: a spec claiming ``depth: 10**12`` over a 2 MB file would otherwise spend
    minutes and GBs building it. Checks the fields present in ``sizes``."""
    shapes = header.shapes
    blocks = len({m.group(1) for k in shapes if (m := _BLOCK_KEY.match(k))})
    problems = []
    for field in ("depth", "stages"):
        if field not in sizes:
            continue
        n = sizes[field]
        what = f"is {n}" if field == "depth" else f"hold {n} blocks in all"
        if n != blocks:
            problems.append((field, f"{what} but the file has tensors for {blocks} blocks (blocks.<i>.*)"))
        elif n > MAX_BLOCKS:
            problems.append((field, f"{what}; a checkpoint may hold at most {MAX_BLOCKS} blocks"))
    # (not head.weight: a pool may have its own width, e.g. SAM's neck or a VLM merger)
    widths = [(key, field) for key, field in (("cls_token", "token_dim"), ("norm.weight", "embed_dim"))
              if field in sizes and key in shapes]
    problems += [("embed_dim", f"is {sizes[field]} but the file's {key} has shape {shapes[key]}")
                 for key, field in widths if sizes[field] not in shapes[key]][:1]  # one problem: the first
    if "reg_tokens" in sizes and _dim(shapes, "reg_token", 1) != sizes["reg_tokens"]:
        where = f"the file's reg_token has shape {shapes['reg_token']}" if "reg_token" in shapes else \
            "the file has no reg_token (0)"
        problems.append(("reg_tokens", f"is {sizes['reg_tokens']} but {where}"))
    if "num_classes" in sizes:
        # the classifier: head.weight, or the 2-D weights of a pool's own head (LeViT's BN-linear)
        heads = {k: v for k, v in shapes.items() if _HEAD_KEY.match(k) and len(v) == 2}
        classes = {v[0] for v in heads.values()} or {0}
        if sizes["num_classes"] not in classes:
            where = (f"the file's {', '.join(f'{k} has shape {v}' for k, v in list(heads.items())[:2])}" if heads
                     else "the file has no head.weight (0)")
            problems.append(("num_classes", f"is {sizes['num_classes']} but {where}"))
    return problems


def _dim(shapes: dict[str, tuple[int, ...]], key: str, dim: int) -> int | None:
    """Size ``dim`` of tensor ``key``; 0 when the file has no such tensor, None when it is too small."""
    if key not in shapes:
        return 0
    return shapes[key][dim] if len(shapes[key]) > dim else None


def _derived_problems(spec, header: _Header) -> list[tuple[str, str]]:
    """Tables built from the spec alone (tokens x embed_dim, e.g. sincos2d) are computed on the CPU
    when the model is loaded, and no tensor in the file bounds the image size they follow."""
    tokens, width = spec.num_tokens, _spec_sizes(spec)["token_dim"]
    values = tokens * width
    limit = max(header.values, MAX_DERIVED_VALUES)
    if values <= limit:
        return []
    h, w = spec.img_hw
    return [("img_size", f"is {h}x{w}: {tokens:,} tokens x embed_dim {width} = {values:,} position values, "
            f"more than {limit:,} (the file's {header.values:,} weight values, or {MAX_DERIVED_VALUES:,})")]


ALIGN = 64  # bytes: what CPU kernels' vectorised loads assume of a tensor's start


def load(path: str | os.PathLike, device: Any = None, dtype: Any = None):
    """Rebuild the model saved by ``vitlab.save``: its spec from the metadata, then its weights.

    The model comes back in training mode, as ``build_model`` makes it; call ``.eval()`` for
    inference.

    Raises:
        WeightsError: not a vitlab checkpoint, unreadable, or weights that do not fit the spec.
        SpecError: the stored spec does not validate (e.g. a plugin component is not installed).
    """
    from safetensors.torch import load_file

    from .recipes import build_model

    path = Path(path)
    spec, header = _open(path)
    model = build_model(spec, device="meta")  # no allocation, no init: every weight comes from the file
    lines = _fit_lines(model.state_dict(), header)  # from the header: no tensor data read yet
    if lines:
        raise WeightsError(f"{path_label(path)}: the weights do not fit the stored spec '{spec.name}':\n"
                           + "\n".join(lines))
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise WeightsError(f"{path_label(path)}: cannot read the tensors ({exc})") from None
    # a tensor at an unaligned offset of the file's buffer would run other (vectorised) kernel
    # paths than the saved model's, and differ in the last bit: such tensors get their own memory
    state = {k: t if t.data_ptr() % ALIGN == 0 else t.clone() for k, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model, spec)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _meta_state(spec) -> dict:
    from .recipes import build_model

    return build_model(spec, device="meta").state_dict()


def _fit_lines(expected: dict, header: _Header) -> list[str]:
    """Key sets, shapes and dtypes of the file against a model built from its spec: one line each."""
    shapes, dtypes = header.shapes, header.dtypes
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [f"{k}: file {shapes[k]} vs spec {tuple(v.shape)}" for k, v in expected.items()
                  if k in shapes and shapes[k] != tuple(v.shape)]
    mismatched += [f"{k}: file dtype {dtypes[k]}, not floating point" for k, v in expected.items()
                   if k in dtypes and v.is_floating_point() and not dtypes[k].startswith(("F", "BF"))]
    lines = [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]
    return lines + [f"shape mismatch: {m}" for m in mismatched]


def _materialize_buffers(model, spec) -> None:
    """Non-persistent buffers (fixed tables such as sincos2d) are functions of the spec, not in the
    file: rebuild them with a second build on the CPU whose parameters go to the meta device as they
    are registered, so the weights are neither allocated nor initialised a second time."""
    meta_buffers = [name for name, b in model.named_buffers() if b.is_meta]
    if not meta_buffers:
        return
    from .recipes import build_model

    with _parameters_on_meta():
        fresh = dict(build_model(spec, device="cpu").named_buffers())
    for name in meta_buffers:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._buffers[attr] = fresh[name]


_PATCH_LOCK = threading.Lock()


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, a parameter registered by this thread moves to the meta device at once: the
    initialisers that follow run on meta (no work, no memory) and buffers stay real. The same idea
    as accelerate's ``init_empty_weights(include_buffers=False)``; other threads are unaffected."""
    from torch import nn

    owner = threading.get_ident()
    with _PATCH_LOCK:  # one patch at a time, so what gets restored is always the real method
        original = nn.Module.register_parameter

        def register(module, name, param):
            if param is not None and threading.get_ident() == owner:
                param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            original(module, name, param)

        nn.Module.register_parameter = register
        try:
            yield
        finally:
            nn.Module.register_parameter = original
