"""FLOPs and parameter reports: :func:`analyze` (fvcore, with vitlab's handles) and :class:`Report`.

Importing this package imports torch but not fvcore or timm; counting imports fvcore.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping

import torch
from torch import nn

from ..spec import as_pair
from .report import KIND_KEYS, Report

__all__ = ["analyze", "Report", "KIND_KEYS", "REAL_WEIGHTS_LIMIT"]

log = logging.getLogger(__name__)

REAL_WEIGHTS_LIMIT = 2 * 2**30
"""Above this many bytes of weights, a model that cannot be counted on meta tensors is counted
with the derived method (one block at a time) instead of a full model in memory."""

Method = Literal["auto", "full", "derived"]


def analyze(
    spec_or_model: Any,
    img_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
    *,
    method: Method = "auto",
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    name: str | None = None,
    second_opinion: bool = True,
    dtype: str = "fp32",
    grad_checkpointing: bool = False,
    cache: Any = None,
) -> Report:
    """FLOPs, parameters, tokens, activations and breakdowns of a recipe or model.

    Args:
        spec_or_model: a ``ViTSpec``, a recipe path or bundled name, a mapping, or an ``nn.Module``
            (counted as it is, on its own device; a vitlab model also gets tokens and kinds).
        img_size: input size; for a recipe it sets the spec's ``img_size`` (so a learned position
            table has the right length), for a model it is the input fed to it. Default: the
            spec's size (224 for a module without a spec).
        batch_size: images per forward; every count scales with it except parameters.
        method: ``"full"`` traces the whole model; ``"derived"`` traces the model without its
            blocks and each distinct block once, then multiplies (see ``vitlab.analysis.derived``);
            ``"auto"`` counts a recipe in full on meta tensors (shapes only: no memory, so any size),
            and, when a component cannot run on meta tensors, in full with real weights if they
            fit in ``REAL_WEIGHTS_LIMIT`` and derived otherwise.
        overrides: dotted recipe overrides (as ``load_spec``), for recipes only.
        name: the report's name (default: the spec's name or the module's class).
        second_opinion: also run ``torch.utils.flop_counter.FlopCounterMode`` (``flop_counter``).
        dtype: ``"fp32"`` or ``"bf16"``: what the memory prediction holds weights and activations in.
        grad_checkpointing: predict memory with each block checkpointed.
        cache: a ``vitlab.analysis.pieces.PieceCache`` shared across calls (sweeps): a recipe counted
            with ``"auto"`` or ``"derived"`` is then derived from pieces already counted, and its
            report says so (``method="derived"``).

    Raises:
        SpecError: a bad recipe or override. VitlabError: a bad size or method.
    """
    from ..errors import VitlabError, unknown_choice

    if method not in ("auto", "full", "derived"):
        raise VitlabError(f"method must be 'auto', 'full' or 'derived', got {method!r}")
    from .memory import DTYPES, check_batch

    check_batch(batch_size, "batch_size")
    if dtype not in DTYPES:
        raise VitlabError(unknown_choice("dtype", dtype, DTYPES))
    mem = _MemoryOptions(dtype, grad_checkpointing, cache)
    if isinstance(spec_or_model, nn.Module):
        if overrides:
            raise VitlabError("overrides apply to recipes, not to a built model")
        return _analyze_module(spec_or_model, img_size, batch_size, method, name, second_opinion, mem)
    return _analyze_spec(spec_or_model, img_size, batch_size, method, overrides, name, second_opinion, mem)


@dataclass
class _MemoryOptions:
    dtype: str = "fp32"
    grad_checkpointing: bool = False
    cache: Any = None


def _memory(model: nn.Module, images_shape: tuple[int, ...], mem: _MemoryOptions, activations: int) -> dict[str, Any]:
    """The memory fields of a report: predicted from a meta pass, or -- for a component that cannot
    run on meta tensors -- estimated from fvcore's activation count (output elements) instead."""
    from ..model import VisionTransformer
    from .count import module_kinds
    from .memory import DTYPES, PieceMemory, predict_module
    from .pieces import combine_parts, predict_vit

    dtype = DTYPES[mem.dtype]
    try:
        if isinstance(model, VisionTransformer):
            memory, by_kind = predict_vit(model, images_shape, dtype, mem.grad_checkpointing, mem.cache)
        else:
            memory, by_kind = predict_module(model, torch.empty(images_shape, device="meta"), dtype, module_kinds(model))
    except Exception as exc:  # noqa: BLE001  (an estimate instead of no answer)
        log.info("meta-device memory pass failed (%s: %s); estimating from the activation count", type(exc).__name__, exc)
        saved = PieceMemory({"other": activations * dtype.itemsize}, 0, 0)
        memory, by_kind = combine_parts(model, dtype, PieceMemory(), [], saved, False)
    return {"memory": memory, "memory_by_kind": by_kind, "dtype": mem.dtype, "grad_checkpointing": mem.grad_checkpointing}


# --- recipes: built on meta ---------------------------------------------------------------------------

def _analyze_spec(source, img_size, batch_size, method, overrides, name, second_opinion, mem) -> Report:
    from ..errors import VitlabError
    from ..model import build_model
    from ..recipes import load_spec, parse_override
    from ..spec import ViTSpec
    from .count import count, materialize, weight_bytes
    from .derived import derived_count

    changes: dict[str, Any] = {}
    if overrides:
        changes = dict(overrides) if isinstance(overrides, Mapping) else dict(parse_override(o) for o in overrides)
    if img_size is not None:
        changes["img_size"] = list(as_pair(img_size))
    spec = source if isinstance(source, ViTSpec) and not changes else load_spec(source, overrides=changes or None)

    model = build_model(spec, device="meta").eval()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    H, W = spec.img_hw
    images = torch.empty(batch_size, spec.in_chans, H, W, device="meta")
    use_derived = method == "derived"
    if use_derived or (mem.cache is not None and method == "auto"):
        # one walk gives the derived counts and the memory prediction together (not two walks)
        try:
            if mem.cache is None:
                from .pieces import PieceCache

                mem = dataclasses.replace(mem, cache=PieceCache())
            return _analyze_cached(model, spec, images, batch_size, name, params, trainable, second_opinion, mem)
        except Exception as exc:  # noqa: BLE001  (anything a walk on meta cannot do: count as usual)
            log.info("cached count of %s failed (%s: %s); counting it alone", spec.name, type(exc).__name__, exc)
            model = build_model(spec, device="meta").eval()
    try:
        with token_trace(model) as tokens:
            if use_derived:
                counts, note = derived_count(model, images, second_opinion=second_opinion, tokens=tokens)
            else:
                counts, note = count(model, (images,), second_opinion), None
        device = "meta"
    except Exception as exc:  # a component that cannot run on meta tensors: real (zero) weights
        log.info("meta-device count of %s failed (%s: %s); counting with real weights", spec.name, type(exc).__name__, exc)
        model = build_model(spec, device="meta").eval()  # fresh: a failed trace leaves hooks behind
        size = weight_bytes(model)
        big = size > REAL_WEIGHTS_LIMIT
        if method == "full" and big:
            raise VitlabError(
                f"{spec.name} cannot be counted on meta tensors ({type(exc).__name__}: {exc}) and a full count "
                f"would need {size / 2**30:.1f} GiB of weights; use method 'derived' (or 'auto')"
            ) from None
        use_derived = method == "derived" or (method == "auto" and big)
        images = torch.zeros(batch_size, spec.in_chans, H, W)
        with token_trace(model) as tokens:
            if use_derived:
                counts, note = derived_count(model, images, materialize_blocks=True, second_opinion=second_opinion,
                                            tokens=tokens)
            else:
                counts, note = count(materialize(model), (images,), second_opinion), None
        device = "cpu"
    return _report(model, counts, note, name or spec.name, params, trainable, (H, W), batch_size,
                   tokens, "derived" if use_derived else "full", device, mem, tuple(images.shape))


def _analyze_cached(model, spec, images, batch_size, name, params, trainable, second_opinion, mem) -> Report:
    """A derived count from the sweep's cache of pieces (``vitlab.analysis.pieces``)."""
    from .memory import DTYPES
    from .pieces import walk_count

    tokens: dict[str, Any] = {}
    counts, note, memory, by_kind = walk_count(model, tuple(images.shape), DTYPES[mem.dtype], mem.grad_checkpointing,
                                               mem.cache, second_opinion, tokens)
    fields = {"memory": memory, "memory_by_kind": by_kind, "dtype": mem.dtype, "grad_checkpointing": mem.grad_checkpointing}
    return _report(model, counts, note, name or spec.name, params, trainable, spec.img_hw, batch_size, tokens,
                   "derived", "meta", mem, tuple(images.shape), memory_fields=fields)


# --- built modules: counted as they are ----------------------------------------------------------------

def _analyze_module(model: nn.Module, img_size, batch_size, method, name, second_opinion, mem) -> Report:
    from ..errors import VitlabError
    from ..model import VisionTransformer
    from .count import count
    from .derived import derived_count

    spec = getattr(model, "spec", None)
    if img_size is None:
        H, W = spec.img_hw if spec is not None else (224, 224)
    else:
        H, W = as_pair(img_size)
    in_chans = spec.in_chans if spec is not None else 3
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    make = torch.empty if device.type == "meta" else torch.zeros
    images = make(batch_size, in_chans, H, W, device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    use_derived = method == "derived"
    if use_derived and not isinstance(model, VisionTransformer):
        raise VitlabError("method='derived' needs a vitlab VisionTransformer (blocks called with a forward state)")
    was_training = model.training
    model.eval()
    try:
        with token_trace(model) as tokens:
            if use_derived:
                counts, note = derived_count(model, images, second_opinion=second_opinion, tokens=tokens)
            else:
                counts, note = count(model, (images,), second_opinion), None
    except ValueError as exc:  # e.g. another image size for a model without dynamic_img_size
        raise VitlabError(f"cannot run the model on a {batch_size}x{in_chans}x{H}x{W} input: {exc}") from None
    finally:
        model.train(was_training)
    label = name or (spec.name if spec is not None else type(model).__name__)
    return _report(model, counts, note, label, params, trainable, (H, W), batch_size, tokens,
                   "derived" if use_derived else "full", device.type, mem, tuple(images.shape))


@contextlib.contextmanager
def token_trace(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Record, during the counting forward, the tokens entering each stage and leaving the last
    block of a vitlab model (the real counts, after merging and transitions). A derived count,
    which runs only distinct blocks, fills the same record itself."""
    from ..model import VisionTransformer

    seen: dict[str, Any] = {}
    if not isinstance(model, VisionTransformer):
        yield seen
        return
    starts = {p.start: p.index for p in model.spec.stage_plans()}

    def before(index: int):
        def hook(module, args):
            if index in starts:
                seen.setdefault(("stage", starts[index]), int(args[0].shape[1]))
        return hook

    def after(module, args):
        seen.setdefault("out", int(args[0].shape[1]))  # what enters the final norm left the last block

    hooks = [b.register_forward_pre_hook(before(i)) for i, b in enumerate(model.blocks)]
    hooks.append(model.norm.register_forward_pre_hook(after))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _token_fields(seen: dict[str, Any]) -> dict[str, Any]:
    stages = [v for k, v in sorted((k, v) for k, v in seen.items() if isinstance(k, tuple))]
    return {"tokens": stages[0] if stages else None, "stage_tokens": stages, "tokens_out": seen.get("out")}


def _report(model, counts, note, name, params, trainable, img_hw, batch_size, tokens, method, device, mem,
            images_shape, memory_fields=None) -> Report:
    from .count import activations, by_kind, by_module, free_ops
    from .handles import FLOPS

    acts = activations(counts)
    memory_fields = memory_fields or _memory(model, images_shape, mem, acts)
    return Report(
        name=name,
        flops=counts.total(FLOPS),
        params=params,
        trainable_params=trainable,
        **_token_fields(tokens),
        activations=acts,
        img_size=img_hw,
        batch_size=batch_size,
        by_kind=by_kind(model, counts),
        by_module=by_module(model, counts),
        by_operator=counts.by_operator(FLOPS),
        unsupported={k: int(v) for k, v in sorted(counts.unsupported.items())},
        free_ops=free_ops(counts),
        flop_counter=counts.flop_counter,
        derived=note is not None,
        derivation=note,
        method=method,
        device=device,
        **memory_fields,
    )
