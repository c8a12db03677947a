"""FLOPs and parameter reports: :func:`analyze` (fvcore, with vitlab's handles) and :class:`Report`.

Importing this package imports torch but not fvcore or timm; counting imports fvcore.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Literal, Mapping

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

    Raises:
        SpecError: a bad recipe or override. VitlabError: a bad size or method.
    """
    from ..errors import VitlabError

    if method not in ("auto", "full", "derived"):
        raise VitlabError(f"method must be 'auto', 'full' or 'derived', got {method!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise VitlabError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(spec_or_model, nn.Module):
        if overrides:
            raise VitlabError("overrides apply to recipes, not to a built model")
        return _analyze_module(spec_or_model, img_size, batch_size, method, name, second_opinion)
    return _analyze_spec(spec_or_model, img_size, batch_size, method, overrides, name, second_opinion)


# --- recipes: built on meta ---------------------------------------------------------------------------

def _analyze_spec(source, img_size, batch_size, method, overrides, name, second_opinion) -> Report:
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
    try:
        if use_derived:
            counts, note = derived_count(model, images, second_opinion=second_opinion)
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
        if use_derived:
            counts, note = derived_count(model, images, materialize_blocks=True, second_opinion=second_opinion)
        else:
            counts, note = count(materialize(model), (images,), second_opinion), None
        device = "cpu"
    return _report(model, counts, note, name or spec.name, params, trainable, (H, W), batch_size,
                   _tokens(model, H, W), "derived" if use_derived else "full", device)


# --- built modules: counted as they are ----------------------------------------------------------------

def _analyze_module(model: nn.Module, img_size, batch_size, method, name, second_opinion) -> Report:
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
        raise VitlabError("method='derived' needs a vitlab VisionTransformer (blocks called as block(x, qk_transform))")
    was_training = model.training
    model.eval()
    try:
        if use_derived:
            counts, note = derived_count(model, images, second_opinion=second_opinion)
        else:
            counts, note = count(model, (images,), second_opinion), None
    except ValueError as exc:  # e.g. another image size for a model without dynamic_img_size
        raise VitlabError(f"cannot run the model on a {batch_size}x{in_chans}x{H}x{W} input: {exc}") from None
    finally:
        model.train(was_training)
    label = name or (spec.name if spec is not None else type(model).__name__)
    return _report(model, counts, note, label, params, trainable, (H, W), batch_size, _tokens(model, H, W),
                   "derived" if use_derived else "full", device.type)


def _tokens(model: nn.Module, H: int, W: int) -> int | None:
    from ..model import VisionTransformer

    if isinstance(model, VisionTransformer):
        gh, gw = model.patch_grid(H, W)
        return model.num_prefix_tokens + gh * gw
    return None


def _report(model, counts, note, name, params, trainable, img_hw, batch_size, tokens, method, device) -> Report:
    from .count import activations, by_kind, by_module, free_ops
    from .handles import FLOPS

    return Report(
        name=name,
        flops=counts.total(FLOPS),
        params=params,
        trainable_params=trainable,
        tokens=tokens,
        activations=activations(counts),
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
    )
