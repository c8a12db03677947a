"""timm weights -> a vitlab model: rename, split fused projections, adapt prefix tokens, resample
position tables, and report what did and did not fit.

The whole conversion is planned from shapes first; nothing is copied until the plan is complete
and (with ``strict=True``) free of problems, so a failed load leaves the model untouched.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import WeightsError
from .sources import Source, open_source

Shape = tuple[int, ...]


@dataclass
class LoadReport:
    """What a load did, by the model's (vitlab) parameter names.

    ``loaded``: copied as stored (possibly renamed); ``converted``: built from split, fused,
    reshaped, folded or zero-filled checkpoint tensors; ``resampled``: position tables brought to
    the model's patch grid; ``missing``: model tensors the checkpoint has nothing for (left as they
    were); ``unexpected``: checkpoint tensors nothing in the model takes; ``mismatched``:
    ``(model key, checkpoint shape, model shape)``; ``notes``: one line per adaptation.
    """

    loaded: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Everything fitted: nothing missing, unexpected or of the wrong shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def problems(self) -> list[str]:
        out = [f"missing: {k}" for k in self.missing]
        out += [f"unexpected: {k}" for k in self.unexpected]
        out += [f"shape mismatch: {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
        return out

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)}, converted {len(self.converted)}, resampled {len(self.resampled)}, "
                f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                f"shape mismatches {len(self.mismatched)}")

    def lines(self) -> list[str]:
        return [self.summary(), *self.problems, *(f"note: {n}" for n in self.notes)]

    def __str__(self) -> str:
        return "\n".join(self.lines())


class Plan:
    """Model key -> how to produce its tensor from the source, filled from shapes only: the
    generic rules below, then each family's ``load_fixups`` (what its tables cannot say)."""

    def __init__(self, model, src: Source):
        self.model = model
        self.src = src
        self.target = model.state_dict()  # detached tensors sharing the parameters' storage
        self.steps: dict[str, Callable[[], torch.Tensor]] = {}
        self.report = LoadReport()
        self.used: set[str] = set()
        self._status: dict[str, str] = {}
        self.unplaced: list[str] = []  # checkpoint tensors (or parts) planned for keys the model lacks
        self.fallback_zeros: list[tuple[str, str]] = []  # zero-filled when nothing else provides them

    # --- bookkeeping --------------------------------------------------------------------------

    def put(self, tkey: str, fn: Callable[[], torch.Tensor], shape: Shape, status: str, *skeys: str,
            note: str | None = None) -> bool:
        """Plan ``tkey`` from ``fn`` (whose result has ``shape``), consuming ``skeys``."""
        if tkey not in self.target or tkey in self._status:
            # no place for (this part of) the checkpoint tensors: unexpected, never silently dropped
            self.unplaced.extend(f"{k} (as {tkey})" for k in skeys)
            return False
        self.used.update(skeys)
        want = tuple(self.target[tkey].shape)
        if tuple(shape) != want:
            self.report.mismatched.append((tkey, tuple(shape), want))
            self._status[tkey] = "mismatched"
            return False
        self.steps[tkey] = fn
        self._status[tkey] = status
        if note:
            self.report.notes.append(f"{tkey}: {note}")
        return True

    def direct(self, tkey: str, skey: str) -> bool:
        """``tkey`` is the source's ``skey`` (converted when a family's table converted it)."""
        src, note = self.src, self.src.converted.get(skey)
        return self.put(tkey, lambda: src.get(skey), src.shape(skey), "converted" if note else "loaded", skey,
                        note=note)

    def free(self, tkey: str) -> bool:
        """Whether the model has ``tkey`` and nothing is planned for it yet."""
        return tkey in self.target and tkey not in self._status

    def zeros(self, tkey: str, why: str) -> None:
        if tkey in self.target and tkey not in self._status:
            t = self.target[tkey]
            self.put(tkey, lambda: torch.zeros_like(t), tuple(t.shape), "converted", note=f"zeros ({why})")

    # --- the rules ----------------------------------------------------------------------------

    def build(self) -> LoadReport:
        from .families import FAMILIES

        self.positions()
        self.splits()
        self.qv_biases()
        for family in FAMILIES:
            if family.load_fixups is not None:
                family.load_fixups(self)
        self.patch_embed()
        self.renamed()
        for tkey, why in self.fallback_zeros:
            if tkey not in self._status:
                self.zeros(tkey, why)
        rep = self.report
        for key in self.target:
            status = self._status.get(key)
            if status is None:
                rep.missing.append(key)
            elif status != "mismatched":
                getattr(rep, status).append(key)
        unplaced = [u for u in self.unplaced if u.split(" ", 1)[0] in self.used]  # parts of used tensors
        rep.unexpected = [k for k in self.src.keys() if k not in self.used] + unplaced
        return rep

    def positions(self) -> None:
        """The learned position table, and class / register tokens whose prefix rows move."""
        from ..components.pos_embed import LearnedPosEmbed, resample_grid

        src, model = self.src, self.model
        if "pos_embed" not in src:
            return
        pe_mod = model.pos_embed
        if not isinstance(pe_mod, LearnedPosEmbed) or getattr(pe_mod, "weight", None) is None:
            self.report.notes.append(f"pos_embed: not loaded, the model's position encoding is "
                                     f"'{model.spec.pos_embed.name}' (no learned table)")
            return
        self.used.add("pos_embed")
        shape = src.shape("pos_embed")
        read, layout = (lambda: src.get("pos_embed")), src.pos_layout
        notes = [src.converted["pos_embed"]] if "pos_embed" in src.converted else []  # a family's table reshaped it
        tkey = "pos_embed.weight"
        want = tuple(self.target[tkey].shape)
        if len(shape) != 3 or shape[0] != 1 or shape[2] != want[2]:
            self.report.mismatched.append((tkey, shape, want))
            self._status[tkey] = "mismatched"
            return
        s_cls = "cls_token" in src
        s_reg = src.shape("reg_token")[1] if "reg_token" in src and len(src.shape("reg_token")) == 3 else 0
        t_cls, t_reg = model.cls_token is not None, model.spec.reg_tokens
        grid = tuple(model.grid_size)
        L, D = shape[1], shape[2]
        layout = layout or self._infer_layout(L, int(s_cls) + s_reg, grid)
        if layout is None:
            self.report.mismatched.append((tkey, shape, want))
            self._status[tkey] = "mismatched"
            self.report.notes.append(f"{tkey}: cannot tell the checkpoint's patch grid from {L} rows")
            return
        s_rows, s_grid = layout
        t_rows = pe_mod.num_prefix
        reshaped = bool(notes)
        if tuple(s_grid) != grid:
            notes.append(f"patch grid {s_grid[0]}x{s_grid[1]} -> {grid[0]}x{grid[1]} (bicubic, as timm)")
        same_prefix = s_rows == t_rows and (not t_rows or (s_cls == t_cls and s_reg == t_reg))
        if t_rows:
            if t_cls and not (s_rows and s_cls):
                notes.append("class-token row zero (the checkpoint embeds no position for it)")
            if t_reg and not (s_rows and s_reg == t_reg):
                notes.append(f"{t_reg} register-token rows zero (the checkpoint has {s_reg if s_rows else 0})")
        if s_rows and not t_rows:
            notes.append(f"{s_rows} prefix-token rows folded into the tokens (the model embeds patches only)")
        elif s_rows and t_rows and (s_cls != t_cls or s_reg != t_reg):
            notes.append("checkpoint prefix rows without a matching model token dropped")

        def table() -> torch.Tensor:
            pe = read()
            patches = resample_grid(pe[:, s_rows:], tuple(s_grid), grid)
            rows = []
            if t_rows:
                if t_cls:
                    rows.append(pe[:, :1] if s_rows and s_cls else pe.new_zeros(1, 1, D))
                if t_reg:
                    start = int(s_cls)
                    rows.append(pe[:, start:start + t_reg] if s_rows and s_reg == t_reg else pe.new_zeros(1, t_reg, D))
            return torch.cat(rows + [patches], dim=1) if rows else patches

        status = "resampled" if tuple(s_grid) != grid else ("loaded" if same_prefix and not reshaped else "converted")
        self.put(tkey, table, (1, t_rows + grid[0] * grid[1], D), status, note="; ".join(notes) or None)

        if s_rows and not t_rows:  # fold each token's own position row into the token
            if t_cls and s_cls and "cls_token" in src:
                self.put("cls_token", lambda: src.get("cls_token") + read()[:, :1],
                         src.shape("cls_token"), "converted", "cls_token", note="plus its position row")
            if t_reg and s_reg == t_reg and "reg_token" in src:
                start = int(s_cls)
                self.put("reg_token", lambda: src.get("reg_token") + read()[:, start:start + s_reg],
                         src.shape("reg_token"), "converted", "reg_token", note="plus their position rows")

    @staticmethod
    def _infer_layout(L: int, prefix: int, grid: tuple[int, int]):
        candidates = [prefix, 0] if prefix else [0]
        for c in candidates:  # the model's own grid first
            if L - c == grid[0] * grid[1]:
                return c, grid
        for c in candidates:
            n = L - c
            r = math.isqrt(max(n, 0))
            if n > 0 and r * r == n:
                return c, (r, r)
        return None

    def splits(self) -> None:
        """The block tensors timm fuses and the model keeps apart (every family's ``SplitFamily``
        tables), split in the model's sizes."""
        from .bridge import SplitFamily
        from .families import tables

        src, tgt = self.src, self.target
        indices = sorted({int(m.group(1)) for k in src.keys() if (m := re.match(r"blocks\.(\d+)\.", k))})
        for family in [t for t in tables() if isinstance(t, SplitFamily)]:
            for i in indices:
                self._split(family, i, family.note)

    def _split(self, family, block: int, note: str) -> None:
        """Each of ``family.split``'s checkpoint tensors in ``block`` -> the model's parts, in the
        model's sizes (a part the model lacks takes the rest, and is reported unexpected)."""
        src, tgt = self.src, self.target
        for entry in family.split:
            skey = entry.source.format(block=block)
            parts = [part.format(block=block) for part in entry.parts]
            if skey not in src or skey in tgt or not any(k in tgt for k in parts):
                continue
            shape, dim = tuple(src.shape(skey)), entry.dim
            known = [tgt[k].shape[dim] if k in tgt and tgt[k].ndim == len(shape) else None for k in parts]
            sizes = entry.sizes(shape[dim], known)
            if sizes is None:
                for k in parts:
                    if k in tgt and k not in self._status:
                        self.report.mismatched.append((k, shape, tuple(tgt[k].shape)))
                        self._status[k] = "mismatched"
                        self.used.add(skey)
                continue
            start = 0
            for k, n in zip(parts, sizes):
                piece = lambda a=start, n=n, skey=skey, dim=dim: src.get(skey).narrow(dim, a, n)  # noqa: E731
                self.put(k, piece, shape[:dim] + (n,) + shape[dim + 1:], "converted", skey, note=note)
                start += n

    def qv_biases(self) -> None:
        """A fused ``qkv.bias`` (a plain ViT's, or BEiT's / EVA's q / v biases fused with their
        zero key bias by the family table) into a ``qkv_bias: qv`` projection's ``q_bias`` and
        ``v_bias``. Its key part must be zero (checked on the values, before anything is copied):
        the model keeps that bias at zero."""
        src, tgt = self.src, self.target
        for qkey in [k for k in tgt if k.endswith("qkv.q_bias")]:
            stem = qkey[:-len("q_bias")]
            skey, vkey = stem + "bias", stem + "v_bias"
            if skey not in src or vkey not in tgt or not (self.free(qkey) and self.free(vkey)):
                continue
            q, v = tgt[qkey].shape[0], tgt[vkey].shape[0]
            shape = tuple(src.shape(skey))
            if len(shape) != 1 or shape[0] != q + 2 * v:  # k as wide as v
                for k in (qkey, vkey):
                    self.report.mismatched.append((k, shape, tuple(tgt[k].shape)))
                    self._status[k] = "mismatched"
                self.used.add(skey)
                continue

            def part(start: int, n: int, skey=skey, q=q, v=v) -> torch.Tensor:
                full = src.get(skey)
                if torch.count_nonzero(full[q:q + v]):
                    raise WeightsError(f"{skey}: non-zero key bias for a model that keeps it at zero "
                                       "(qkv_bias: qv); load it into qkv_bias: true")
                return full[start:start + n]

            note = "split from the fused qkv bias (zero key bias)"
            self.put(qkey, functools.partial(part, 0, q), (q,), "converted", skey, note=note)
            self.put(vkey, functools.partial(part, q + v, v), (v,), "converted", skey, note=note)

    def patch_embed(self) -> None:
        src = self.src
        skey = tkey = "patch_embed.proj.weight"
        if skey not in src or tkey not in self.target or tkey in self._status:
            return
        want = tuple(self.target[tkey].shape)
        shape = src.shape(skey)
        if len(want) == 2 and len(shape) == 4 and want == (shape[0], math.prod(shape[1:])):
            # the linear embedder flattens patches in the conv kernel's (C, ph, pw) order
            self.put(tkey, lambda: src.get(skey).reshape(want), shape[:1] + (want[1],), "converted", skey,
                     note="conv kernel flattened for the linear patch embedder")
            return
        # (D, C, h, w) -> the model's patch (D, C, ph, pw), or its flattened (D, C * ph * pw)
        patch = tuple(self.model.spec.patch_hw)
        if len(shape) != 4 or shape[2:] == patch or want not in ((*shape[:2], *patch),
                                                                  (shape[0], shape[1] * patch[0] * patch[1])):
            return

        def resampled() -> torch.Tensor:
            from timm.layers import resample_patch_embed

            return resample_patch_embed(src.get(skey), list(patch), interpolation="bicubic",
                                        antialias=True).reshape(want)

        note = (f"patch kernel {shape[2]}x{shape[3]} resampled to {patch[0]}x{patch[1]} with FlexiViT's "
                "pseudo-inverse (timm's resample_patch_embed)")
        self.put(tkey, resampled, want, "resampled", skey, note=note)

    def renamed(self) -> None:
        """Every other checkpoint tensor under its model key: timm's ViT names read forward
        (``export.VITLAB``)."""
        from .export import VITLAB

        tgt, src = self.target, self.src
        # a norm after taking tokens (timm's fc_norm with token or no pooling, PiT's norm of its
        # class tokens) is a final norm when the model's pool has none
        fc_norm_is_final = ("pool.norm.weight" not in tgt and "norm.weight" in tgt and "norm.weight" not in src
                            and self.model.spec.pool.name in ("token", "none", "distilled"))
        for skey in src.keys():
            if skey in self.used:
                continue
            tkey = VITLAB.to_vitlab(skey)
            if fc_norm_is_final and tkey.startswith("pool.norm."):
                tkey = "norm." + tkey[len("pool.norm."):]
            if tkey in tgt and tkey not in self._status:
                self.direct(tkey, skey)


def plan_load(model, src: Source) -> tuple[Plan, LoadReport]:
    """The plan of loading ``src`` into ``model``, and its report (nothing copied yet)."""
    from .equivalents import renames
    from .families import table_of
    from .layouts import convert

    note = src.note
    src, converted = convert(model, src)  # an original layout (CLIP, DINOv2 ...) in timm's names
    table = table_of(src.keys())
    if table is not None:  # another timm family's names: seen in ViT names (``bridge``)
        src = table.adapt(src, depths=[plan.depth for plan in model.spec.stage_plans()])
    if (plugins := renames(model)) is not None:  # plugin twins' parameter names
        src = plugins.adapt(src)
    plan = Plan(model, src)
    report = plan.build()
    report.notes[:0] = [n for n in (note, converted) if n]
    return plan, report


def load_timm_weights(model, source: Any, strict: bool = True) -> LoadReport:
    """Load timm weights into a vitlab model.

    Args:
        model: a vitlab ``VisionTransformer``.
        source: a timm model, a state dict (timm names), or a local ``.safetensors`` /
            ``.pth`` / ``.pt`` / ``.bin`` file (pickles are read with ``weights_only=True``), or a
            big_vision ``.npz``. Checkpoints in the original layouts timm converts (OpenAI CLIP,
            open_clip, DINOv2 / v3, EVA, PE ...) go through the family's own timm filter
            (``layouts``); a patch kernel of another size is resampled as FlexiViT does.
        strict: raise ``WeightsError`` (with the report) when anything is missing, unexpected
            or of the wrong shape, before copying anything; ``False`` loads what fits.

    Returns:
        A ``LoadReport`` of what was loaded, converted, resampled, missing, unexpected or mismatched.
    """
    from ..model import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"load_timm_weights loads into a vitlab VisionTransformer, got {type(model).__name__}")
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".npz":
        from .layouts import open_npz

        opened = contextlib.nullcontext(open_npz(model, source))
    else:
        opened = open_source(source)
    with opened as src:
        plan, report = plan_load(model, src)
        if strict and not report.ok:
            raise WeightsError(
                f"{src.label}: checkpoint does not fit the model '{model.spec.name}' (nothing was loaded):\n"
                + "\n".join(report.lines())
            )
        with torch.no_grad():
            # every value first (views of the file where no conversion is needed), so a bad
            # dtype is refused before anything is copied
            values = {tkey: fn() for tkey, fn in plan.steps.items()}
            wrong = [f"{k}: {v.dtype} for a {plan.target[k].dtype} parameter" for k, v in values.items()
                     if plan.target[k].is_floating_point() and not v.is_floating_point()]
            if wrong:
                raise WeightsError(
                    f"{src.label}: tensors of the wrong dtype (nothing was loaded):\n" + "\n".join(wrong)
                )
            for tkey, value in values.items():
                plan.target[tkey].copy_(value)
    return report
