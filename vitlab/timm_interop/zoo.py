"""How much of timm's isotropic ViT zoo ``spec_from_timm`` reads: every model of the families
below, built on the meta device (structure only, nothing allocated or downloaded), read or refused.

A refusal must be a clean vitlab error naming the feature (``SpecError``); anything else is a
crash and is reported as such. ``scripts/zoo_coverage.py`` prints the table the README shows.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..errors import VitlabError
from ..model import VisionTransformer

# timm modules whose ViTs vitlab reads, in the README's order: the isotropic ones (single width, one
# token grid; the VLM vision towers when the installed timm has them), then the hierarchical ones
FAMILIES: tuple[str, ...] = (
    "vision_transformer", "deit", "eva", "vision_transformer_sam", "beit", "vision_transformer_relpos",
    "cait", "vision_transformer_hybrid", "xcit", "convit", "naflexvit", "qwen3_vit", "gemma4_vit",
    "deepseek_vit", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr",
    "pvt_v2", "twins", "levit", "mvitv2", "hiera", "hieradet_sam2", "nest", "coat", "tiny_vit", "volo",
    "davit", "gcvit",
)


@dataclass
class Outcome:
    """One model: ``read`` or why not. ``kind`` is ``read``, ``refused`` (a vitlab error),
    ``crash`` (any other exception from vitlab) or ``unbuildable`` (timm cannot build it on meta)."""

    name: str
    family: str
    kind: str
    reason: str = ""
    exported: bool = False  # a read model whose spec goes back to timm and reads back the same
    export_reason: str = ""
    params: tuple[int, int] = (0, 0)  # a read model's parameters: timm's, vitlab's (both built on meta)


@dataclass
class FamilyCoverage:
    family: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def read(self) -> int:
        return sum(o.kind == "read" for o in self.outcomes)

    @property
    def exported(self) -> int:
        return sum(o.exported for o in self.outcomes)

    def first(self, kind: str) -> Outcome | None:
        return next((o for o in self.outcomes if o.kind == kind), None)


def families() -> list[str]:
    """The families the installed timm has."""
    import importlib

    out = []
    for fam in FAMILIES:
        try:
            importlib.import_module(f"timm.models.{fam}")
        except ImportError:
            continue
        out.append(fam)
    return out


# In-place ops timm's weight init runs. On meta they compute nothing, yet some dispatch through
# slow reference decompositions (trunc_normal_'s clamp_: ~2 ms each), ~80 % of building a model.
_INIT_OPS = frozenset({"uniform_", "normal_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_", "fill_",
                       "zero_", "copy_"})


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Skip ``_INIT_OPS`` on meta tensors: they change no shape, dtype or flag, only values meta has not."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _INIT_OPS and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta():
    """Build on the meta device without running weight init (structure only)."""
    with torch.device("meta"), _SkipMetaInit():
        yield


def meta_model(name: str, **kwargs):
    """``timm.create_model(name)`` on the meta device (``pretrained=False``), weight init skipped."""
    import timm

    with on_meta():
        return timm.create_model(name, pretrained=False, **kwargs)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # "cannot convert timm model 'x': unsupported y" -> "y": the feature, not the model
    if ": unsupported " in text:
        return text.split(": unsupported ", 1)[1]
    return re.sub(r"^cannot convert timm model '[^']*': ", "", text)


def read_one(name: str, family: str, registry=None) -> Outcome:
    """Build ``name`` on the meta device and read it (components from ``registry``, default
    ``vitlab.plugins.load_registry()``)."""
    from .spec_from import spec_from_timm

    try:
        model = meta_model(name)
    except Exception as exc:  # noqa: BLE001 - timm's own limitation, not vitlab's
        return Outcome(name, family, "unbuildable", f"{type(exc).__name__}: {_reason(exc)}")
    try:
        spec = spec_from_timm(model, registry=registry)
    except VitlabError as exc:
        return Outcome(name, family, "refused", _reason(exc))
    except Exception as exc:  # noqa: BLE001 - the point is to report it, not to stop
        return Outcome(name, family, "crash", f"{type(exc).__name__}: {exc}")
    with on_meta():
        ours = VisionTransformer(spec, device="meta", registry=registry)
    params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in ours.parameters()))
    return Outcome(name, family, "read", params=params, **_export(spec, registry))


def _export(spec, registry) -> dict:
    """Back to timm, on meta: ``timm_class(spec)(**timm_kwargs(spec))`` reads back as ``spec`` (but
    for the fields the family's timm class does not keep, ``TimmFamily.unkept``: NaFlexVit's nominal size)."""
    from .spec_from import spec_from_timm
    from .to_timm import timm_class, timm_kwargs, unkept_fields

    try:
        with on_meta():
            tm = timm_class(spec, registry=registry)(**timm_kwargs(spec, registry=registry))
            back = spec_from_timm(tm, registry=registry)
    except VitlabError as exc:
        return {"export_reason": _reason(exc)}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {"export_reason": f"crash {type(exc).__name__}: {exc}"}
    drop = {"name", *unkept_fields(spec)}
    if back.model_dump(exclude=drop) != spec.model_dump(exclude=drop):
        return {"export_reason": "timm's model reads back as another spec"}
    return {"exported": True}


def coverage(which: Iterable[str] | None = None, names: Iterable[str] | None = None,
             registry=None) -> list[FamilyCoverage]:
    """Per family (default: all the installed timm has), every model read or refused.

    Args:
        which: the families to read.
        names: only these models (within the families).
        registry: where components are looked up (default: ``vitlab.plugins.load_registry()``).
    """
    import timm

    keep = set(names) if names is not None else None
    out = []
    for fam in which or families():
        cov = FamilyCoverage(fam)
        for name in timm.list_models(module=fam):
            if keep is None or name in keep:
                cov.outcomes.append(read_one(name, fam, registry))
        out.append(cov)
    return out


def markdown(table: list[FamilyCoverage]) -> str:
    """The README's table: family, read / total, and the first refusal per family."""
    import timm

    rows = [f"Counted with timm {timm.__version__}, every model built on the meta device. *Back to timm*: the "
            "spec read gives timm's class and arguments (`timm_class`, `timm_kwargs`), and that model reads back "
            "as the same spec (NaFlexVit's but for its nominal image size, which timm does not keep).", "",
            "| timm module | read | back to timm | first refusal |", "|---|---:|---:|---|"]
    for cov in table:
        first = cov.first("crash") or cov.first("refused") or cov.first("unbuildable")
        why = "" if first is None else f"`{first.name}`: {first.reason}"
        if first is not None and first.kind != "refused":
            why = f"**{first.kind}** {why}"
        unexported = next((o for o in cov.outcomes if o.kind == "read" and not o.exported), None)
        if first is None and unexported is not None:
            why = f"export of `{unexported.name}`: {unexported.export_reason}"
        why = why.replace("|", "\\|")
        rows.append(f"| `{cov.family}` | {cov.read} / {cov.total} | {cov.exported} / {cov.read} | {why} |")
    read, total = sum(c.read for c in table), sum(c.total for c in table)
    exported = sum(c.exported for c in table)
    rows.append(f"| **all** | **{read} / {total}** | **{exported} / {read}** | |")
    return "\n".join(rows)
