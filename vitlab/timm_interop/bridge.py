"""One declarative bridge per timm family: how its state-dict keys are renamed and fused relative
to timm's plain ``VisionTransformer`` layout (which ``weights`` loads and ``export`` writes).

A :class:`Family` is data: ``renames`` (timm template <-> vitlab template) and ``fused`` (one
vitlab tensor <-> the timm tensors it concatenates). Import reads it forward (``adapt``: a
checkpoint in the family's names becomes a source in ViT names); export reads the same entries
inverted (``restore``: ViT names back to the family's). Templates use ``{block}`` for a block index
and ``{rest}`` for the rest of a dotted name; a staged timm model numbers its blocks per stage,
``{stage}`` and ``{j}`` (its block j), which the model's stage depths turn into vitlab's ``{block}``.
The tables themselves, one or more per family, are in ``families``; this module is how they are read.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Container, Iterable, Mapping, Sequence

import torch

from ..errors import WeightsError
from .sources import Source

ZERO = None  # a fused part timm does not store because it is always zero (EVA's key bias)
_FIELDS = {"rest": r"(?P<rest>.+)", "stage": r"(?P<stage>\d+)", "j": r"(?P<j>\d+)", "block": r"(?P<block>\d+)"}


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, rx in _FIELDS.items():
        out = out.replace(re.escape("{" + name + "}"), rx)
    return re.compile(out + "$")


def _match(template: str, key: str, depths: Sequence[int] | None = None) -> dict[str, str] | None:
    """The fields of ``key`` in ``template``; with stage ``depths``, ``{block}`` and ``{stage}`` /
    ``{j}`` given each other (``None``: no such block, a ``{j}`` beyond its stage's depth)."""
    m = _pattern(template).match(key)
    if m is None:
        return None
    f = m.groupdict()
    if depths is None or not ({"block", "j"} & set(f)):
        return f
    starts = [sum(depths[:s]) for s in range(len(depths))]
    if "block" in f:
        b = int(f["block"])
        stage = next((s for s in range(len(depths)) if starts[s] <= b < starts[s] + depths[s]), None)
        return None if stage is None else {**f, "stage": str(stage), "j": str(b - starts[stage])}
    stage, j = int(f["stage"]), int(f["j"])
    if stage >= len(depths) or j >= depths[stage]:
        return None
    return {**f, "block": str(starts[stage] + j)}


@dataclass(frozen=True)
class Fuse:
    """vitlab's ``target`` is timm's ``parts`` concatenated along ``dim``; a ``ZERO`` part is one
    timm keeps as a zero buffer outside its state dict, the size of the others. Without a ``ZERO``
    part the sizes along ``dim`` may differ (grouped-query q / k / v): ``restore`` takes them from
    the target's tensors (equal chunks without them)."""

    target: str
    parts: tuple[str | None, ...]
    dim: int = 0


@dataclass(frozen=True)
class Family:
    """How one timm family's checkpoint differs from timm's ``VisionTransformer`` names.

    Args:
        name: the family, for messages.
        marker: a regex any key of the family's checkpoints matches (and no plain ViT key does).
        renames: ``(timm template, vitlab template)``, first match wins in either direction.
        fused: the tensors stored split in timm and fused in vitlab.
        appended: a timm module list whose blocks vitlab numbers on after timm's ``blocks`` (CaiT's
            ``blocks_token_only``): its block j is vitlab's ``blocks.{lead + j}``, ``lead`` the
            number of timm's ``blocks``. Renamed before ``renames`` apply (and after, on export).
    """

    name: str
    marker: str
    renames: tuple[tuple[str, str], ...] = ()
    fused: tuple[Fuse, ...] = field(default_factory=tuple)
    appended: str | None = None

    def matches(self, keys: Iterable[str]) -> bool:
        rx = re.compile(self.marker)
        return any(rx.match(k) for k in keys)

    # --- forward: timm name -> vitlab name ----------------------------------------------------

    def to_vitlab(self, key: str, depths: Sequence[int] | None = None) -> str:
        for timm_t, vitlab_t in self.renames:
            if (f := _match(timm_t, key, depths)) is not None:
                return vitlab_t.format(**f)
        return key

    def to_timm(self, key: str, into: Container[str] | None = None, depths: Sequence[int] | None = None) -> str:
        """vitlab's ``key`` in timm's names: the first rename that matches (given ``into``, the
        target model's keys, the first whose timm name the target has)."""
        for timm_t, vitlab_t in self.renames:
            if (f := _match(vitlab_t, key, depths)) is not None and (into is None or timm_t.format(**f) in into):
                return timm_t.format(**f)
        return key

    def _append_blocks(self, src: Source) -> Source:
        """``src`` with the ``appended`` list's block j named ``blocks.{lead + j}``."""
        lead = 1 + max((int(m.group(1)) for k in src.keys() if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
        rx = re.compile(re.escape(self.appended) + r"\.(\d+)\.(.+)$")
        names = {}  # new name -> the source's
        for key in src.keys():
            m = rx.match(key)
            names[f"blocks.{lead + int(m.group(1))}.{m.group(2)}" if m else key] = key
        return src.replaced({n: src.shape(k) for n, k in names.items()}, lambda n: src.get(names[n]))

    def adapt(self, src: Source, depths: Sequence[int] | None = None) -> Source:
        """``src`` (this family's names) seen in ViT names: renamed, split tensors fused.
        ``depths``: the stage depths of the model it loads into (for ``{stage}`` / ``{j}``)."""
        if self.appended:
            src = self._append_blocks(src)
        shapes: dict[str, tuple[int, ...]] = {}
        getters: dict[str, Callable[[], torch.Tensor]] = {}
        consumed: set[str] = set()
        converted: dict[str, str] = {}
        blocks = sorted({int(m.group(1)) for k in src.keys() if (m := re.search(r"blocks\.(\d+)\.", k))})
        for fuse in self.fused:
            for b in blocks:
                names = [None if p is ZERO else p.format(block=b) for p in fuse.parts]
                present = [n for n in names if n is not None]
                if not present or not all(n in src for n in present):
                    continue
                part_shapes = [tuple(src.shape(n)) for n in present]
                across = {s[:fuse.dim] + s[fuse.dim + 1:] for s in part_shapes}  # all but the fused dim
                if len(across) != 1 or (len(set(part_shapes)) != 1 and len(present) != len(names)):
                    continue  # left as they are (a ZERO part takes the size the others share): the load reports them
                one = part_shapes[0]
                shape = list(one)
                shape[fuse.dim] = sum(s[fuse.dim] for s in part_shapes) + one[fuse.dim] * (len(names) - len(present))
                target = fuse.target.format(block=b)

                def get(names=names, one=one, dim=fuse.dim) -> torch.Tensor:
                    real = next(src.get(n) for n in names if n is not None)
                    return torch.cat([real.new_zeros(one) if n is None else src.get(n) for n in names], dim=dim)

                shapes[target], getters[target] = tuple(shape), get
                consumed.update(present)
        for key in src.keys():
            if key in consumed:
                continue
            new = self.to_vitlab(key, depths)
            shapes[new] = src.shape(key)
            getters[new] = functools.partial(src.get, key)
            if key in src.converted:
                converted[new] = src.converted[key]
        return src.replaced(shapes, lambda k: getters[k](), label=f"{src.label} ({self.name} names)",
                            converted=converted)

    # --- inverted: vitlab name -> timm name ----------------------------------------------------

    def restore(self, sd: Mapping[str, torch.Tensor], lead: int | None = None, *,
                into: Container[str] | Mapping[str, torch.Tensor] | None = None,
                inert_zero: bool = False, depths: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """A state dict in ViT names back in this family's names (``adapt`` read backwards).
        ``lead``: with ``appended``, the number of vitlab blocks that are timm's ``blocks``;
        ``depths``: the model's stage depths (for ``{stage}`` / ``{j}``).

        ``into``: the target timm model's keys, for a family with more than one layout (EVA keeps
        q / k / v apart or fused): a tensor the target has under its own name stays whole, any
        other goes to the first entry whose names the target has (default: the first that matches;
        not with ``appended``, whose names are the target's only after this). Given the target's
        tensors (meta ones will do), a fused tensor is split in the sizes of the target's parts.
        ``inert_zero``: the ``ZERO`` parts do nothing in this model (a key bias the softmax ignores:
        no RoPE, no qk-norm), so they are dropped whatever their values.

        Raises:
            WeightsError: a part timm keeps at zero (``ZERO``) is non-zero here (and not inert), or
                a fused tensor is not the size of the target's parts together.
        """
        if self.appended and lead is None:
            raise ValueError(f"restoring {self.name} names needs lead, the blocks before its {self.appended}")
        if self.appended and into is not None:
            raise ValueError(f"restoring {self.name} names into a target's keys is not supported ({self.appended})")
        out: dict[str, torch.Tensor] = {}
        rest = dict(sd)
        for fuse in self.fused:
            for key in list(rest):
                f = _match(fuse.target, key)
                if f is None:
                    continue
                if into is not None and (key in into or not all(p.format(**f) in into for p in fuse.parts
                                                                if p is not ZERO)):
                    continue  # the target keeps it whole, or split as another entry says
                tensor = rest.pop(key)
                if isinstance(into, Mapping) and ZERO not in fuse.parts:  # the parts may differ (grouped-query k / v)
                    sizes = [into[p.format(**f)].shape[fuse.dim] for p in fuse.parts]
                    if sum(sizes) != tensor.shape[fuse.dim]:
                        raise WeightsError(f"{key}: {tensor.shape[fuse.dim]} along dim {fuse.dim} for timm's "
                                           f"{self.name} parts of sizes {sizes}")
                    chunks = tensor.split(sizes, dim=fuse.dim)
                else:
                    chunks = tensor.chunk(len(fuse.parts), dim=fuse.dim)
                for part, chunk in zip(fuse.parts, chunks):
                    if part is ZERO:
                        if not inert_zero and torch.count_nonzero(chunk):
                            raise WeightsError(f"{key}: the part timm's {self.name} keeps at zero is non-zero; "
                                               "no timm equivalent of these weights")
                        continue
                    out[part.format(**f)] = chunk.contiguous()
        for key, tensor in rest.items():
            out[self.to_timm(key, into, depths)] = tensor
        if self.appended:
            out = {self._unappend(k, lead): v for k, v in out.items()}
        return out

    def _unappend(self, key: str, lead: int) -> str:
        """vitlab's ``blocks.{lead + j}.*`` -> the ``appended`` list's block j (``_append_blocks`` inverted)."""
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if m is None or int(m.group(1)) < lead:
            return key
        return f"{self.appended}.{int(m.group(1)) - lead}.{m.group(2)}"


@dataclass(frozen=True)
class ImagePosFamily(Family):
    """A family whose position table is an image (1, gh, gw, D) (SAM's): seen as vitlab's rows
    (1, gh * gw, D) on import, an image again on export (``restore`` given the grid)."""

    def adapt(self, src: Source, depths: Sequence[int] | None = None) -> Source:
        out = super().adapt(src, depths)
        shape = out.shape("pos_embed") if "pos_embed" in out else ()
        if len(shape) != 4:
            return out
        _, gh, gw, D = shape
        get = lambda k: out.get(k).flatten(1, 2) if k == "pos_embed" else out.get(k)  # noqa: E731
        return out.replaced({**out.shapes, "pos_embed": (1, gh * gw, D)}, get, pos_layout=(0, (gh, gw)))

    def restore(self, sd: Mapping[str, torch.Tensor], *args, grid: tuple[int, int] | None = None,
                **kw) -> dict[str, torch.Tensor]:
        out = super().restore(sd, *args, **kw)
        if grid is not None and "pos_embed" in out:
            out["pos_embed"] = out["pos_embed"].reshape(1, grid[0], grid[1], -1)  # (1, gh * gw, D) -> image
        return out


@dataclass(frozen=True)
class Split:
    """timm's ``source`` is vitlab's ``parts`` concatenated along ``dim``: ``Fuse`` the other way
    round, in parts of different sizes (an MLP's hidden width, three times the model's). Import
    splits it in the model's sizes (``sizes``); export concatenates the parts (``SplitFamily``)."""

    source: str
    parts: tuple[str, ...]
    dim: int = 0

    def sizes(self, total: int, model: list[int | None]) -> list[int] | None:
        """The parts' sizes along ``dim`` of a ``total``: the model's (``None`` for a part the
        model lacks, which takes the rest); ``None`` when they cannot add up to ``total``."""
        unknown = model.count(None)
        rest = total - sum(n for n in model if n is not None)
        if unknown > 1 or rest < 0 or (unknown == 0 and rest) or (unknown == 1 and not rest):
            return None
        return [rest if n is None else n for n in model]


@dataclass(frozen=True)
class SplitFamily(Family):
    """A family with tensors timm fuses and vitlab keeps apart (``split``), besides ``renames``.
    ``adapt`` only renames: a split needs the model's sizes, so the load plans it (``weights``)."""

    split: tuple[Split, ...] = ()
    note: str = ""  # the load report's note on a split tensor

    def restore(self, sd: Mapping[str, torch.Tensor], lead: int | None = None, *,
                into: Container[str] | Mapping[str, torch.Tensor] | None = None,
                inert_zero: bool = False) -> dict[str, torch.Tensor]:
        """``Family.restore``, each ``split`` entry's parts first concatenated into its timm tensor
        (given ``into``, the target's keys, only into a tensor the target has)."""
        rest, joined = dict(sd), {}
        for entry in self.split:
            for key in list(rest):
                if (f := _match(entry.parts[0], key)) is None:
                    continue
                names, source = [p.format(**f) for p in entry.parts], entry.source.format(**f)
                if all(n in rest for n in names) and (into is None or source in into):
                    joined[source] = torch.cat([rest.pop(n) for n in names], dim=entry.dim)
        return {**super().restore(rest, lead, into=into, inert_zero=inert_zero), **joined}
