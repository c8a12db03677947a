"""FLOPs and parameter reports: :func:`analyze` (fvcore, with vitlab's handles) and :class:`Report`.

A model is counted (:func:`_count`) in full -- one trace of the whole model -- or derived -- the
walk of ``vitlab.analysis.pieces``, each distinct piece once -- and a recipe always on meta tensors
(shapes only: no memory, so any size). Only a component that cannot run on meta tensors
(``count.META_FAILURES``) sends a recipe to real zero weights on the CPU; the result says so
(:attr:`Counted.fell_back`, ``Report.device``).

Importing this package imports torch but not fvcore or timm; counting imports fvcore.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
from torch import nn

from ..errors import VitlabError, unknown_choice
from ..model import VisionTransformer
from ..spec import as_pair
from .count import META_FAILURES, Counts
from .memory import DTYPES, PieceMemory, check_batch
from .report import KIND_KEYS, Report

__all__ = ["analyze", "Counted", "Report", "KIND_KEYS", "REAL_WEIGHTS_LIMIT"]

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
            blocks and each distinct block once, then multiplies (see ``vitlab.analysis.pieces``);
            ``"auto"`` is ``"full"``, or ``"derived"`` with a shared ``cache``. A recipe counts on
            meta tensors; when a component cannot, on real weights in full if they fit in
            ``REAL_WEIGHTS_LIMIT`` and derived otherwise.
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
    if method not in ("auto", "full", "derived"):
        raise VitlabError(f"method must be 'auto', 'full' or 'derived', got {method!r}")
    check_batch(batch_size, "batch_size")
    if dtype not in DTYPES:
        raise VitlabError(unknown_choice("dtype", dtype, DTYPES))
    memory = _MemoryOptions(DTYPES[dtype], dtype, grad_checkpointing, cache)
    if isinstance(spec_or_model, nn.Module):
        if overrides:
            raise VitlabError("overrides apply to recipes, not to a built model")
        return _analyze_module(spec_or_model, img_size, batch_size, method, name, second_opinion, memory)

    from ..recipes import build_model

    spec = _load(spec_or_model, img_size, overrides)
    model = build_model(spec, device="meta").eval()
    images = torch.empty(batch_size, spec.in_chans, *spec.img_hw, device="meta")
    counted = _count(model, images, method, cache, second_opinion=second_opinion, memory=memory.dtype,
                     rebuild=lambda: build_model(spec, device="meta").eval())
    return _report(counted, name or spec.name, spec.img_hw, tuple(images.shape), memory)


@dataclass
class _MemoryOptions:
    dtype: torch.dtype
    name: str
    grad_checkpointing: bool
    cache: Any


def _load(source: Any, img_size, overrides):
    """The spec of a recipe with ``overrides`` and ``img_size`` applied (a spec unchanged as it is)."""
    from ..recipes import load_spec, parse_override
    from ..spec import ViTSpec

    changes: dict[str, Any] = {}
    if overrides:
        changes = dict(overrides) if isinstance(overrides, Mapping) else dict(parse_override(o) for o in overrides)
    if img_size is not None:
        changes["img_size"] = list(as_pair(img_size))
    if isinstance(source, ViTSpec) and not changes:
        return source
    return load_spec(source, overrides=changes or None, registry=getattr(source, "registry", None))


def _analyze_module(model: nn.Module, img_size, batch_size, method, name, second_opinion, memory) -> Report:
    """A built module, counted as it is, where it is (no fallback: it is the caller's model)."""
    spec = getattr(model, "spec", None)
    if img_size is None:
        H, W = spec.img_hw if spec is not None else (224, 224)
    else:
        H, W = as_pair(img_size)
    in_chans = spec.in_chans if spec is not None else 3
    if method == "derived" and not isinstance(model, VisionTransformer):
        raise VitlabError("method='derived' needs a vitlab VisionTransformer (blocks called with a forward state)")
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    make = torch.empty if device.type == "meta" else torch.zeros
    images = make(batch_size, in_chans, H, W, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counted = _count(model, images, method, memory.cache if method == "derived" else None,
                         second_opinion=second_opinion, memory=memory.dtype)
    except ValueError as exc:  # e.g. another image size for a model without dynamic_img_size
        raise VitlabError(f"cannot run the model on a {batch_size}x{in_chans}x{H}x{W} input: {exc}") from None
    finally:
        model.train(was_training)
    label = name or (spec.name if spec is not None else type(model).__name__)
    return _report(counted, label, (H, W), tuple(images.shape), memory)


# --- counting ----------------------------------------------------------------------------------------

@dataclass
class Counted:
    """How one model was counted, and what came out."""

    model: nn.Module
    """What was counted: the model given, or a fresh build after a fallback."""
    counts: Counts
    note: str | None
    """How a derived count was derived; ``None`` for a full trace."""
    tokens: dict[Any, int]
    """Tokens entering each stage (``("stage", i)``) and leaving the last block (``"out"``)."""
    device: str
    """Where the pieces ran: ``"meta"`` (shapes only), the module's device, or ``"cpu"``."""
    fell_back: bool = False
    """A meta model that could not run on meta tensors was counted on real zero weights."""
    memory: tuple[PieceMemory, list[PieceMemory], PieceMemory] | None = None
    """Per-piece memory (embedding, blocks, head), when the counting walk read it too."""

    @property
    def method(self) -> str:
        return "full" if self.note is None else "derived"


def _count(model: nn.Module, images: torch.Tensor, method: str, cache: Any, *, second_opinion: bool = True,
           memory: torch.dtype | None = None, rebuild: Callable[[], nn.Module] | None = None) -> Counted:
    """Count ``model`` on ``images``: in full (``"full"``, or ``"auto"`` without a shared cache),
    else derived through ``cache``; ``memory``: a dtype the derived walk also reads memory at.

    ``rebuild`` (a fresh meta model) allows the one fallback: a meta model whose components
    cannot run on meta tensors is counted again on real zero weights."""
    derived = method == "derived" or (method == "auto" and cache is not None)
    try:
        return _count_as_is(model, images, derived, cache, second_opinion, memory)
    except META_FAILURES as exc:
        if rebuild is None or not images.is_meta:
            raise
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    log.info("meta-device count of %s failed (%s); counting with real weights", _label(model), reason)
    return _count_on_real_weights(rebuild(), tuple(images.shape), method, second_opinion, reason)


def _label(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    return spec.name if spec is not None else type(model).__name__


def _count_as_is(model, images, derived, cache, second_opinion, memory) -> Counted:
    from .count import count
    from .pieces import Walk

    if derived:
        walked = Walk(model, cache, second_opinion=second_opinion).run(
            images, memory=memory if images.is_meta else None)
        return Counted(model, walked.counts, walked.note, walked.tokens, images.device.type, memory=walked.memory)
    with token_trace(model) as tokens:
        counts = count(model, (images,), second_opinion)
    return Counted(model, counts, None, tokens, images.device.type)


def _count_on_real_weights(model, images_shape, method, second_opinion, reason) -> Counted:
    """The fallback: ``model`` (fresh, on meta: a failed trace leaves hooks behind) on zero CPU
    weights, in full when they fit in ``REAL_WEIGHTS_LIMIT``, else one block at a time."""
    from .count import count, materialize, weight_bytes
    from .pieces import Walk

    size = weight_bytes(model)
    big = size > REAL_WEIGHTS_LIMIT
    if method == "full" and big:
        raise VitlabError(
            f"{_label(model)} cannot be counted on meta tensors ({reason}) and a full count would need "
            f"{size / 2**30:.1f} GiB of weights; use method 'derived' (or 'auto')")
    images = torch.zeros(images_shape)
    if method == "derived" or (method == "auto" and big):
        walked = Walk(model, second_opinion=second_opinion, real_weights=True).run(images)
        return Counted(model, walked.counts, walked.note, walked.tokens, "cpu", fell_back=True)
    with token_trace(model) as tokens:
        counts = count(materialize(model), (images,), second_opinion)
    return Counted(model, counts, None, tokens, "cpu", fell_back=True)


@contextlib.contextmanager
def token_trace(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Record, during a full count's forward, the tokens entering each stage and leaving the last
    block of a vitlab model (the real counts, after merging and transitions). A derived count
    records the same itself (``pieces.Walked.tokens``)."""
    seen: dict[Any, int] = {}
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


# --- the report --------------------------------------------------------------------------------------

def _memory(counted: Counted, images_shape: tuple[int, ...], options: _MemoryOptions, activations: int) -> dict[str, Any]:
    """The memory fields of a report: from the counting walk, else predicted from a meta pass, or --
    for a component that cannot run on meta tensors -- estimated from fvcore's activation count
    (output elements) instead."""
    from .count import module_kinds
    from .memory import predict_module
    from .pieces import combine_parts, predict_vit

    model, dtype = counted.model, options.dtype
    try:
        if counted.memory is not None:
            memory, by_kind = combine_parts(model, dtype, *counted.memory, options.grad_checkpointing)
        elif isinstance(model, VisionTransformer):
            memory, by_kind = predict_vit(model, images_shape, dtype, options.grad_checkpointing, options.cache)
        else:
            memory, by_kind = predict_module(model, torch.empty(images_shape, device="meta"), dtype, module_kinds(model))
    except META_FAILURES as exc:  # an estimate instead of no answer
        log.info("meta-device memory pass failed (%s: %s); estimating from the activation count", type(exc).__name__, exc)
        saved = PieceMemory({"other": activations * dtype.itemsize}, 0, 0)
        memory, by_kind = combine_parts(model, dtype, PieceMemory(), [], saved, False)
    return {"memory": memory, "memory_by_kind": by_kind, "dtype": options.name,
            "grad_checkpointing": options.grad_checkpointing}


def _token_fields(seen: dict[Any, int]) -> dict[str, Any]:
    stages = [v for k, v in sorted((k, v) for k, v in seen.items() if isinstance(k, tuple))]
    return {"tokens": stages[0] if stages else None, "stage_tokens": stages, "tokens_out": seen.get("out")}


def _report(counted: Counted, name: str, img_hw: tuple[int, int], images_shape: tuple[int, ...],
            options: _MemoryOptions) -> Report:
    from .count import activations, by_kind, by_module, free_ops, free_reasons
    from .handles import FLOPS

    model, counts = counted.model, counted.counts
    acts = activations(counts)
    return Report(
        name=name,
        flops=counts.total(FLOPS),
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        **_token_fields(counted.tokens),
        activations=acts,
        img_size=img_hw,
        batch_size=images_shape[0],
        by_kind=by_kind(model, counts),
        by_module=by_module(model, counts),
        by_operator=counts.by_operator(FLOPS),
        unsupported={k: int(v) for k, v in sorted(counts.unsupported.items())},
        free_ops=free_ops(counts),
        free_why=free_reasons(free_ops(counts), getattr(model, "registry", None)),
        flop_counter=counts.flop_counter,
        derived=counted.note is not None,
        derivation=counted.note,
        method=counted.method,
        device=counted.device,
        **_memory(counted, images_shape, options, acts),
    )
