"""Helpers the timm comparison tests share: weights perturbed away from their initialisation, a
no-grad eval forward, equality within a relative tolerance, seeded images, and the checks every
timm family's tests make against an independent reference (timm's own models and fvcore on them,
vitlab's full trace for derived counts): outputs after loading timm's weights, FLOPs, derived
counts, the round trip back to timm, and a family's coverage."""
from __future__ import annotations

import torch
from torch import nn

RTOL = 1e-4  # the bar: outputs equal timm's within 1e-4 of the largest output


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter, so zero biases, unit norm weights and tiny layer scales cannot hide
    a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal within ``rtol`` of the largest output."""
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= rtol * theirs.abs().max().item(), f"max abs difference {diff:.3g}"


def images(spec, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, spec.in_chans, *spec.img_hw, generator=torch.Generator().manual_seed(1))


def fvcore_flops(name: str, img_hw=(224, 224), **kw) -> int:
    """fvcore's FLOPs of timm's own model ``name`` (``create_model(name, **kw)``), built with fused
    attention off as the issue asks (``timm.layers.set_fused_attn(False)`` before ``create_model``;
    timm's flag is restored after): the independent reference FLOP tests compare against."""
    import timm
    from fvcore.nn import FlopCountAnalysis

    config = timm.layers.config
    saved = config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    try:
        tm = timm.create_model(name, pretrained=False, **kw).eval()
    finally:
        config._USE_FUSED_ATTN = saved
    assert not any(getattr(m, "fused_attn", False) for m in tm.modules())
    flops = FlopCountAnalysis(tm, torch.randn(1, 3, *img_hw))
    return flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()


def _inputs(spec, inputs) -> tuple[torch.Tensor, ...]:
    """``inputs(spec)`` as a tuple of images (default: ``images(spec)``)."""
    xs = images(spec) if inputs is None else inputs(spec)
    return (xs,) if isinstance(xs, torch.Tensor) else tuple(xs)


def assert_outputs_match_timm(tm: nn.Module, weights=None, inputs=None):
    """The vitlab model read from timm's model ``tm`` (``spec_from_timm``), with ``weights`` loaded
    (default: ``tm.state_dict()``; a checkpoint path or original-layout dict also works) and every
    tensor accounted for, gives ``tm``'s outputs on ``inputs(spec)`` (default: ``images(spec)``; a
    tensor or a sequence of them). The independent reference is timm's own forward, never vitlab's.
    Returns the vitlab model and the load report, for checks of what was loaded how."""
    from vitlab import build_model
    from vitlab.timm_interop import load_timm_weights, spec_from_timm

    spec = spec_from_timm(tm)
    model = build_model(spec)
    report = load_timm_weights(model, tm.state_dict() if weights is None else weights)
    assert report.ok, str(report)
    for x in _inputs(spec, inputs):
        assert_close(outputs(model, x), outputs(tm, x))
    return model, report


def assert_flops_match_fvcore(name: str, *, rtol: float = 0.005, **kw):
    """vitlab's full-trace FLOPs of ``spec_from_timm(name, **kw)`` are within ``rtol`` (default
    0.5 %; 0 asks for equality) of fvcore's on timm's own unfused model ``create_model(name, **kw)``
    (``fvcore_flops``, the independent reference), and the trace met no unsupported operator.
    Returns ``(spec, full analysis, fvcore's FLOPs)``."""
    import vitlab
    from vitlab.timm_interop import spec_from_timm

    spec = spec_from_timm(name, **kw)
    full = vitlab.analyze(spec, method="full")
    theirs = fvcore_flops(name, spec.img_hw, **kw)
    assert abs(full.flops - theirs) <= rtol * theirs, (full.flops, theirs)
    assert full.unsupported == {}
    return spec, full, theirs


DERIVED_ONLY = ("derived", "derivation", "method", "device")  # keys that say how a count was made


def assert_derived_equals_full(spec):
    """``analyze(spec, method="derived")`` (counts derived from a few traced blocks) equals the full
    trace of the whole model, its definition and the reference, in every key but those saying how
    the count was made (``DERIVED_ONLY``). Returns the full analysis."""
    import vitlab

    full, derived = vitlab.analyze(spec, method="full"), vitlab.analyze(spec, method="derived")
    assert derived.derived and not full.derived
    drop = DERIVED_ONLY
    assert ({k: v for k, v in derived.to_dict().items() if k not in drop}
            == {k: v for k, v in full.to_dict().items() if k not in drop})
    return full


def assert_round_trip(spec, prepare=None, *, inputs=None, timm_cls=None, exclude=frozenset({"name"})):
    """Back to timm: a vitlab model of ``spec`` with every parameter perturbed (``randomize``, then
    ``prepare(model)`` for what that leaves alone or what timm ties together), exported with
    ``to_timm_state_dict``, loads strictly into timm's own class for the spec (``timm_class(spec)``,
    built from ``timm_kwargs(spec)``; checked to be ``timm_cls``, a class or its name, when given).
    timm's model, the reference, gives the vitlab model's outputs on ``inputs(spec)`` (as in
    ``assert_outputs_match_timm``) and reads back as the same spec but for ``exclude``. Returns the
    spec read back."""
    from vitlab import build_model
    from vitlab.timm_interop import spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict

    model = randomize(build_model(spec, seed=0))
    if prepare is not None:
        prepare(model)
    model.eval()
    tm = timm_class(spec)(**timm_kwargs(spec)).eval()
    if timm_cls is not None:
        assert (type(tm).__name__ if isinstance(timm_cls, str) else type(tm)) == timm_cls, type(tm)
    tm.load_state_dict(to_timm_state_dict(model), strict=True)
    for x in _inputs(spec, inputs):
        assert_close(outputs(model, x), outputs(tm, x))
    back = spec_from_timm(tm)
    assert back.model_dump(exclude=set(exclude)) == spec.model_dump(exclude=set(exclude))
    return back


def assert_family_reads(family: str, refused=None, *, names=None, total=None):
    """``zoo.coverage`` of timm's module ``family`` (each model timm lists for it, or only ``names``,
    built on the meta device and read by ``spec_from_timm``) reads every model but the named
    refusals. The reference is timm's own model list: the outcomes are exactly its models (or
    ``names``, all still in timm), ``total`` of them when given. Whatever is not read is a clean
    refusal, and ``refused`` (phrase of the reason -> how many refusals name it) accounts for every
    one. Every model read also goes back to timm: timm's class built from ``timm_kwargs`` on meta
    reads back as the same spec (``zoo``'s *back to timm*). Returns the coverage."""
    import timm

    from vitlab.timm_interop import zoo

    refused = dict(refused or {})
    (cov,) = zoo.coverage([family], names=names)
    listed = timm.list_models(module=family) if names is None else names
    assert sorted(o.name for o in cov.outcomes) == sorted(listed)
    assert cov.total > 0
    if total is not None:
        assert cov.total == total
    not_read = [o for o in cov.outcomes if o.kind != "read"]
    assert all(o.kind == "refused" for o in not_read), [(o.name, o.kind, o.reason) for o in not_read]
    counts = {key: sum(key in o.reason for o in not_read) for key in refused}
    assert counts == refused and sum(counts.values()) == len(not_read), [(o.name, o.reason) for o in not_read]
    unexported = [(o.name, o.export_reason) for o in cov.outcomes if o.kind == "read" and not o.exported]
    assert not unexported, unexported
    return cov
