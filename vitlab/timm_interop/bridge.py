"""One declarative bridge per timm family: how its state-dict keys are renamed and fused relative
to timm's plain ``VisionTransformer`` layout (which ``weights`` loads and ``to_timm`` writes).

A :class:`Family` is data: ``renames`` (timm template <-> vitlab template) and ``fused`` (one
vitlab tensor <-> the timm tensors it concatenates). Import reads it forward (``adapt``: a
checkpoint in the family's names becomes a source in ViT names); export reads the same entries
inverted (``restore``: ViT names back to the family's). Templates use ``{block}`` for a block index
and ``{rest}`` for the rest of a dotted name.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from ..errors import WeightsError
from .sources import Source

ZERO = None  # a fused part timm does not store because it is always zero (EVA's key bias)


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    out = re.escape(template)
    out = out.replace(re.escape("{block}"), r"(?P<block>\d+)").replace(re.escape("{rest}"), r"(?P<rest>.+)")
    return re.compile(out + "$")


def _match(template: str, key: str) -> dict[str, str] | None:
    m = _pattern(template).match(key)
    return None if m is None else m.groupdict()


@dataclass(frozen=True)
class Fuse:
    """vitlab's ``target`` is timm's ``parts`` concatenated along ``dim`` (equal sizes); a ``ZERO``
    part is one timm keeps as a zero buffer outside its state dict."""

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
    """

    name: str
    marker: str
    renames: tuple[tuple[str, str], ...] = ()
    fused: tuple[Fuse, ...] = field(default_factory=tuple)

    def matches(self, keys: Iterable[str]) -> bool:
        rx = re.compile(self.marker)
        return any(rx.match(k) for k in keys)

    # --- forward: timm name -> vitlab name ----------------------------------------------------

    def to_vitlab(self, key: str) -> str:
        for timm_t, vitlab_t in self.renames:
            if (f := _match(timm_t, key)) is not None:
                return vitlab_t.format(**f)
        return key

    def to_timm(self, key: str) -> str:
        for timm_t, vitlab_t in self.renames:
            if (f := _match(vitlab_t, key)) is not None:
                return timm_t.format(**f)
        return key

    def adapt(self, src: Source) -> Source:
        """``src`` (this family's names) seen in ViT names: renamed, split tensors fused."""
        shapes: dict[str, tuple[int, ...]] = {}
        getters: dict[str, Callable[[], torch.Tensor]] = {}
        consumed: set[str] = set()
        blocks = sorted({int(m.group(1)) for k in src.keys() if (m := re.search(r"blocks\.(\d+)\.", k))})
        for fuse in self.fused:
            for b in blocks:
                names = [None if p is ZERO else p.format(block=b) for p in fuse.parts]
                present = [n for n in names if n is not None]
                if not present or not all(n in src for n in present):
                    continue
                part_shapes = [src.shape(n) for n in present]
                if len({s for s in part_shapes}) != 1:
                    continue  # left as they are: the load reports them
                one = part_shapes[0]
                shape = list(one)
                shape[fuse.dim] = one[fuse.dim] * len(names)
                target = fuse.target.format(block=b)

                def get(names=names, one=one, dim=fuse.dim) -> torch.Tensor:
                    real = next(src.get(n) for n in names if n is not None)
                    return torch.cat([real.new_zeros(one) if n is None else src.get(n) for n in names], dim=dim)

                shapes[target], getters[target] = tuple(shape), get
                consumed.update(present)
        for key in src.keys():
            if key in consumed:
                continue
            new = self.to_vitlab(key)
            shapes[new] = src.shape(key)
            getters[new] = functools.partial(src.get, key)
        return Source(shapes, lambda k: getters[k](), f"{src.label} ({self.name} names)", src.pos_layout)

    # --- inverted: vitlab name -> timm name ----------------------------------------------------

    def restore(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict in ViT names back in this family's names (``adapt`` read backwards).

        Raises:
            WeightsError: a part timm keeps at zero (``ZERO``) is non-zero here.
        """
        out: dict[str, torch.Tensor] = {}
        rest = dict(sd)
        for fuse in self.fused:
            for key in list(rest):
                f = _match(fuse.target, key)
                if f is None:
                    continue
                tensor = rest.pop(key)
                chunks = tensor.chunk(len(fuse.parts), dim=fuse.dim)
                for part, chunk in zip(fuse.parts, chunks):
                    if part is ZERO:
                        if torch.count_nonzero(chunk):
                            raise WeightsError(f"{key}: the part timm's {self.name} keeps at zero is non-zero; "
                                               "no timm equivalent of these weights")
                        continue
                    out[part.format(**f)] = chunk.contiguous()
        for key, tensor in rest.items():
            out[self.to_timm(key)] = tensor
        return out


# DeiT's distilled models: the distillation token is vitlab's first register token, its
# classifier the distilled pool's ``head.dist``
DEIT_DISTILLED = Family(
    "deit_distilled", marker=r"dist_token$",
    renames=(("dist_token", "reg_token"), ("head_dist.{rest}", "head.dist.{rest}")),
)

# EVA's and BEiT's fused qkv: q and v biases stored, the key bias always zero (a buffer outside
# the state dict)
_QV_BIAS = Fuse("blocks.{block}.attn.qkv.bias", ("blocks.{block}.attn.q_bias", ZERO, "blocks.{block}.attn.v_bias"))

# timm's Eva: bare layer-scale parameters; q / k / v kept apart, or fused with the zero key bias
EVA = Family(
    "eva", marker=r"blocks\.\d+\.(gamma_[12]|attn\.(q_bias|v_bias|q_proj\.weight))$",
    renames=(("blocks.{block}.gamma_1", "blocks.{block}.ls1.gamma"),
             ("blocks.{block}.gamma_2", "blocks.{block}.ls2.gamma")),
    fused=(
        Fuse("blocks.{block}.attn.qkv.weight", ("blocks.{block}.attn.q_proj.weight", "blocks.{block}.attn.k_proj.weight",
                                                "blocks.{block}.attn.v_proj.weight")),
        Fuse("blocks.{block}.attn.qkv.bias", ("blocks.{block}.attn.q_proj.bias", ZERO, "blocks.{block}.attn.v_proj.bias")),
        _QV_BIAS,
    ),
)

# timm's Beit: EVA's layer scales and fused q / v bias (zero key bias); each block's relative
# position table keeps timm's name in ``mhsa_relpos``. Listed before EVA, whose marker BEiT's
# checkpoints match too.
BEIT = Family(
    "beit", marker=r"blocks\.\d+\.attn\.relative_position_bias_table$",
    renames=EVA.renames, fused=(_QV_BIAS,),
)

# timm's VisionTransformerRelPos: the bias shared by every block is vitlab's position encoding
# (``relpos_mlp``); a per-block table sits in ``mhsa_relpos`` itself, not in a ``rel_pos`` module
# (the per-block MLP keeps timm's ``attn.rel_pos.mlp`` names)
RELPOS = Family(
    "relpos", marker=r"(blocks\.\d+\.attn\.rel_pos|shared_rel_pos)\.",
    renames=(("shared_rel_pos.{rest}", "pos_embed.rel_pos.{rest}"),
             ("blocks.{block}.attn.rel_pos.relative_position_bias_table",
              "blocks.{block}.attn.relative_position_bias_table")),
)

FAMILIES: tuple[Family, ...] = (DEIT_DISTILLED, BEIT, RELPOS, EVA)


def family_of(keys: Iterable[str]) -> Family | None:
    """The family whose checkpoints have these keys, ``None`` for timm's plain ViT names."""
    keys = list(keys)
    return next((f for f in FAMILIES if f.matches(keys)), None)
