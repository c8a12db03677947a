"""Helpers the timm comparison tests share: weights perturbed away from their initialisation, a
no-grad eval forward, equality within a relative tolerance, seeded images, and the checks every
timm family's tests make against an independent reference (timm's own models and fvcore on them,
vitlab's full trace for derived counts): outputs after loading timm's weights, FLOPs, derived
counts, the round trip back to timm, and a family's coverage.

The expensive references are computed once per session (per xdist worker): a family's zoo
coverage (``family_coverage``) and fvcore's count of a timm model (``fvcore_flops``)."""
from __future__ import annotations

import functools
from typing import Callable

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


def randomize_stats(model: nn.Module, seed: int = 1, mean: float = 0.1) -> nn.Module:
    """BatchNorm running statistics away from their (0, 1) start (``randomize`` perturbs parameters
    only), so a wrongly mapped or ignored buffer shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * mean)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def perturb_buffers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the saved buffers ``randomize`` leaves alone values that act: Gemma 4's clamps (±inf
    as built) to ±1.5, its post-pool standardisation to a random shift and scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith(("input_min", "output_min", "input_max", "output_max")):
                b.fill_(-1.5 if name.endswith("_min") else 1.5)
            elif name.endswith("std_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("std_scale"):
                b.copy_(1 + torch.randn(b.shape, generator=g) * 0.1)
    return model


def one_layer_scale_if_parallel(model: nn.Module) -> nn.Module:
    """timm's parallel blocks have one layer scale for both branches: the vitlab model's two made equal."""
    if model.spec.block.name == "parallel":
        with torch.no_grad():
            for block in model.blocks:
                if hasattr(block.ls2, "gamma"):  # one already with shared_layer_scale
                    block.ls2.gamma.copy_(block.ls1.gamma)
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


def vlm_images(spec, batch: int = 2) -> torch.Tensor:
    """``images`` in [0, 1] for Gemma 4 (which maps pixels from [0, 1] itself), as they are for the others."""
    x = images(spec, batch)
    return x.sigmoid() if spec.patch_embed.name == "linear_pixnorm" else x


OTHER_SIZES = [(80, 48), (96, 160)]  # non-square grids: aspect-preserving resampling crops


def sized_images(spec) -> list[torch.Tensor]:
    """Images at the spec's size and at ``OTHER_SIZES`` (and, where patches are padded, one not
    made of whole patches): NaFlexVit's position table resampled for each."""
    hw = [spec.img_hw, *OTHER_SIZES] + ([(90, 50)] if spec.patch_embed.params["pad"] else [])
    return [torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in hw]


def with_changes(data: dict, **changes) -> dict:
    """A spec mapping ``data`` with ``{kind: {"params": {...}}}`` merged into its selections, other
    keys replaced: a valid spec a family's timm class may not hold."""
    out = dict(data)
    for key, value in changes.items():
        if isinstance(value, dict) and "params" in value and key in out and "name" not in value:
            out[key] = {**out[key], "params": {**out[key].get("params", {}), **value["params"]}}
        else:
            out[key] = value
    return out


def fvcore_flops(name: str, img_hw=(224, 224), **kw) -> int:
    """fvcore's FLOPs of timm's own model ``name`` (``create_model(name, **kw)``), built with fused
    attention off as the issue asks (``timm.layers.set_fused_attn(False)`` before ``create_model``;
    timm's flag is restored after): the independent reference FLOP tests compare against. Counted
    once per session for each model and arguments."""
    key = (name, tuple(img_hw), repr(sorted(kw.items())))  # kwargs hold lists: keyed by their repr
    if key not in _FVCORE:
        _FVCORE[key] = _count_fvcore(name, img_hw, **kw)
    return _FVCORE[key]


_FVCORE: dict[tuple, int] = {}


def _count_fvcore(name: str, img_hw, **kw) -> int:
    import timm

    return fvcore_flops_of(lambda: timm.create_model(name, pretrained=False, **kw), img_hw)


def fvcore_flops_of(build: Callable[[], nn.Module], img_hw) -> int:
    """fvcore's FLOPs of the timm model ``build()`` makes (a model class with its own config, where
    ``create_model`` merges arguments of its own), built with fused attention off as in ``fvcore_flops``."""
    import timm
    from fvcore.nn import FlopCountAnalysis

    config = timm.layers.config
    saved = config._USE_FUSED_ATTN
    timm.layers.set_fused_attn(False)
    try:
        tm = build().eval()
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


def assert_derived_equals_full(spec, also_drop=frozenset()):
    """``analyze(spec, method="derived")`` (counts derived from a few traced blocks) equals the full
    trace of the whole model, its definition and the reference, in every key but those saying how
    the count was made (``DERIVED_ONLY``, and ``also_drop``). Returns the full analysis."""
    import vitlab

    full, derived = vitlab.analyze(spec, method="full"), vitlab.analyze(spec, method="derived")
    assert derived.derived and not full.derived
    drop = set(DERIVED_ONLY) | set(also_drop)
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


@functools.lru_cache(maxsize=None)
def family_coverage(family: str):
    """``zoo.coverage`` of timm's module ``family``: every model timm lists for it built on the meta
    device, read by ``spec_from_timm`` and sent back to timm. Computed once per session, inside a
    test (under conftest's registry of vitlab's built-ins only)."""
    from vitlab.timm_interop import zoo

    (cov,) = zoo.coverage([family])
    return cov


def assert_family_reads(cov, refused=None, *, names=None, total=None):
    """The coverage ``cov`` of one family (``family_coverage``) reads every model but the named
    refusals. The reference is timm's own model list: the outcomes are exactly its models, ``total``
    of them when given, and ``names`` are all among them and read. Whatever is not read is a clean
    refusal, and ``refused`` (phrase of the reason -> how many refusals name it) accounts for every
    one. Every model read also goes back to timm: timm's class built from ``timm_kwargs`` on meta
    reads back as the same spec (``zoo``'s *back to timm*). Returns the coverage."""
    import timm

    refused = dict(refused or {})
    assert sorted(o.name for o in cov.outcomes) == sorted(timm.list_models(module=cov.family))
    assert cov.total > 0
    if total is not None:
        assert cov.total == total
    kinds = {o.name: o.kind for o in cov.outcomes}
    assert all(kinds.get(n) == "read" for n in names or ()), {n: kinds.get(n) for n in names}
    not_read = [o for o in cov.outcomes if o.kind != "read"]
    assert all(o.kind == "refused" for o in not_read), [(o.name, o.kind, o.reason) for o in not_read]
    counts = {key: sum(key in o.reason for o in not_read) for key in refused}
    assert counts == refused and sum(counts.values()) == len(not_read), [(o.name, o.reason) for o in not_read]
    unexported = [(o.name, o.export_reason) for o in cov.outcomes if o.kind == "read" and not o.exported]
    assert not unexported, unexported
    return cov
