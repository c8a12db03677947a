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
from typing import Callable, Container, Iterable, Mapping

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

    def to_vitlab(self, key: str) -> str:
        for timm_t, vitlab_t in self.renames:
            if (f := _match(timm_t, key)) is not None:
                return vitlab_t.format(**f)
        return key

    def to_timm(self, key: str, into: Container[str] | None = None) -> str:
        """vitlab's ``key`` in timm's names: the first rename that matches (given ``into``, the
        target model's keys, the first whose timm name the target has)."""
        for timm_t, vitlab_t in self.renames:
            if (f := _match(vitlab_t, key)) is not None and (into is None or timm_t.format(**f) in into):
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
        return Source({n: src.shape(k) for n, k in names.items()}, lambda n: src.get(names[n]), src.label,
                      src.pos_layout)

    def adapt(self, src: Source) -> Source:
        """``src`` (this family's names) seen in ViT names: renamed, split tensors fused."""
        if self.appended:
            src = self._append_blocks(src)
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
            new = self.to_vitlab(key)
            shapes[new] = src.shape(key)
            getters[new] = functools.partial(src.get, key)
        return Source(shapes, lambda k: getters[k](), f"{src.label} ({self.name} names)", src.pos_layout)

    # --- inverted: vitlab name -> timm name ----------------------------------------------------

    def restore(self, sd: Mapping[str, torch.Tensor], lead: int | None = None, *,
                into: Container[str] | Mapping[str, torch.Tensor] | None = None,
                inert_zero: bool = False) -> dict[str, torch.Tensor]:
        """A state dict in ViT names back in this family's names (``adapt`` read backwards).
        ``lead``: with ``appended``, the number of vitlab blocks that are timm's ``blocks``.

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
            out[self.to_timm(key, into)] = tensor
        if self.appended:
            out = {self._unappend(k, lead): v for k, v in out.items()}
        return out

    def _unappend(self, key: str, lead: int) -> str:
        """vitlab's ``blocks.{lead + j}.*`` -> the ``appended`` list's block j (``_append_blocks`` inverted)."""
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if m is None or int(m.group(1)) < lead:
            return key
        return f"{self.appended}.{int(m.group(1)) - lead}.{m.group(2)}"


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
    "eva", marker=r"(blocks\.\d+\.(gamma_[12]|attn\.(q_bias|v_bias|q_proj\.weight))|rope\.freqs)$",
    renames=(("blocks.{block}.gamma_1", "blocks.{block}.ls1.gamma"),
             ("blocks.{block}.gamma_2", "blocks.{block}.ls2.gamma"),
             ("rope.freqs", "pos_embed.freqs")),  # RoPE-Mixed's learned per-block frequencies
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

# timm's Cait: the class-attention blocks (``blocks_token_only``) follow the self-attention blocks in
# vitlab's numbering, the class token is the ``class_token`` transition's into stage 1, and the
# layer scales are bare parameters as EVA's. Listed before EVA, whose marker CaiT's checkpoints match.
CAIT = Family(
    "cait", marker=r"blocks_token_only\.",
    renames=(("cls_token", "transitions.1.cls_token"), *EVA.renames),
    appended="blocks_token_only",
)

# timm's NaFlexVit: one ``embeds`` module holds the patch projection and its norm, the class /
# register tokens and the position table(s) of ``naflex``, each kept in timm's own layout
NAFLEX = Family(
    "naflexvit", marker=r"embeds\.(proj|pos_embed|cls_token|reg_token)",
    renames=(("embeds.proj.{rest}", "patch_embed.proj.{rest}"), ("embeds.norm.{rest}", "patch_embed.norm.{rest}"),
             ("embeds.cls_token", "cls_token"), ("embeds.reg_token", "reg_token"),
             ("embeds.pos_embed", "pos_embed.weight"), ("embeds.pos_embed_y", "pos_embed.weight_y"),
             ("embeds.pos_embed_x", "pos_embed.weight_x")),
)

# timm's Xcit: bare layer scales ``gamma1..3`` (numbered as the official checkpoints), the class
# token as CaiT's, the class-attention blocks (``cls_attn_blocks``) numbered on after ``blocks``
XCIT = Family(
    "xcit", marker=r"(cls_attn_blocks\.|blocks\.\d+\.local_mp\.)",
    renames=(("cls_token", "transitions.1.cls_token"),
             ("blocks.{block}.gamma1", "blocks.{block}.ls1.gamma"),
             ("blocks.{block}.gamma2", "blocks.{block}.ls2.gamma"),
             ("blocks.{block}.gamma3", "blocks.{block}.ls3.gamma")),
    appended="cls_attn_blocks",
)


@dataclass(frozen=True)
class _ImagePosFamily(Family):
    """A family whose position table is an image (1, gh, gw, D) (SAM's): seen as vitlab's rows
    (1, gh * gw, D) on import, an image again on export (``restore`` given the grid)."""

    def adapt(self, src: Source) -> Source:
        out = super().adapt(src)
        shape = out.shape("pos_embed") if "pos_embed" in out else ()
        if len(shape) != 4:
            return out
        _, gh, gw, D = shape
        get = lambda k: out.get(k).flatten(1, 2) if k == "pos_embed" else out.get(k)  # noqa: E731
        return Source({**out.shapes, "pos_embed": (1, gh * gw, D)}, get, out.label, (0, (gh, gw)))

    def restore(self, sd: Mapping[str, torch.Tensor], *args, grid: tuple[int, int] | None = None,
                **kw) -> dict[str, torch.Tensor]:
        out = super().restore(sd, *args, **kw)
        if grid is not None and "pos_embed" in out:
            out["pos_embed"] = out["pos_embed"].reshape(1, grid[0], grid[1], -1)  # (1, gh * gw, D) -> image
        return out


# timm's VisionTransformerSAM: the neck is the ``sam_neck`` pool's, the classifier ``head.fc``
# vitlab's ``head``, the decomposed tables keep timm's names (``attn.rel_pos_h`` / ``rel_pos_w``)
SAM = _ImagePosFamily(
    "sam", marker=r"(neck\.|blocks\.\d+\.attn\.rel_pos_[hw]$)",
    renames=(("neck.{rest}", "pool.neck.{rest}"), ("head.fc.{rest}", "head.{rest}")),
)

# timm's ConVit: the class token, inserted after the GPSA blocks, is the ``class_token``
# transition's into stage 1; GPSA keeps timm's names (``attn.qk``, ``attn.v``, ``attn.pos_proj``)
CONVIT = Family(
    "convit", marker=r"blocks\.\d+\.attn\.(gating_param$|pos_proj\.)",
    renames=(("cls_token", "transitions.1.cls_token"),),
)

# vitlab's own names for what every family's timm model names as timm's ``VisionTransformer``
# does: a learned table is its module's ``weight``; the norm after pooling (``fc_norm``) and the
# attention pool are vitlab's ``pool`` (which of the two ``pool.norm`` is, the target's keys
# tell). Part of timm's own ViT names, so no entry of ``FAMILIES``: loading reads it forward for
# the keys its rules do not place (``weights``: position tables are resampled and their prefix rows
# moved there; a ``fc_norm`` after token pooling is a final norm when the pool has none), every
# export inverted (``export_state_dict``, ``to_timm.vit_state_dict``).
VITLAB = Family(
    "vitlab", marker=r"(?!)",
    renames=(("pos_embed", "pos_embed.weight"), ("fc_norm.{rest}", "pool.norm.{rest}"),
             ("attn_pool.{rest}", "pool.{rest}")),
)


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


# timm's ParallelScalingBlock and DiffParallelScalingBlock (timm's own ViT names, so no entry of
# ``FAMILIES``): one norm, one input projection [MLP fc1 | q k v], the attention's norms and lambdas
# in the block itself, the output projections apart or fused (over [attention | MLP] features, one
# bias). What names cannot say is code beside the readers: one layer scale serves both branches
# (``ls2`` equals ``ls1``), the fused output's bias serves either branch (summed on export), and an
# MLP bias one side has and the other lacks is zero (``weights._Plan._parallel``,
# ``to_timm._parallel_values``).
PARALLEL = SplitFamily(
    "parallel", marker=r"blocks\.\d+\.in_proj\.weight$",
    renames=(("blocks.{block}.in_norm.{rest}", "blocks.{block}.norm1.{rest}"),
             ("blocks.{block}.q_norm.{rest}", "blocks.{block}.attn.q_norm.{rest}"),
             ("blocks.{block}.k_norm.{rest}", "blocks.{block}.attn.k_norm.{rest}"),
             ("blocks.{block}.sub_norm.{rest}", "blocks.{block}.attn.sub_norm.{rest}"),  # differential
             ("blocks.{block}.lambda_{rest}", "blocks.{block}.attn.lambda_{rest}"),  # differential
             ("blocks.{block}.attn_out_proj.{rest}", "blocks.{block}.attn.proj.{rest}"),
             ("blocks.{block}.out_proj.bias", "blocks.{block}.attn.proj.bias"),  # the fused output's
             ("blocks.{block}.mlp_out_proj.{rest}", "blocks.{block}.mlp.fc2.{rest}"),
             ("blocks.{block}.mlp_bias", "blocks.{block}.mlp.fc1.bias"),  # no qkv bias: in_proj has no bias
             ("blocks.{block}.ls.gamma", "blocks.{block}.ls1.gamma")),
    split=(Split("blocks.{block}.in_proj.weight", ("blocks.{block}.mlp.fc1.weight", "blocks.{block}.attn.qkv.weight")),
           Split("blocks.{block}.in_proj.bias", ("blocks.{block}.mlp.fc1.bias", "blocks.{block}.attn.qkv.bias")),
           Split("blocks.{block}.out_proj.weight", ("blocks.{block}.attn.proj.weight", "blocks.{block}.mlp.fc2.weight"),
                 dim=1)),
)

# timm's SwiGLUPacked (``GluMlp``; DeepSeek's tower): one ``fc1``, the gate's rows first. Split on
# load into a model with vitlab's ``swiglu`` (``weights``)
SWIGLU_PACKED = SplitFamily(
    "swiglu_packed", marker=r"(?!)",
    split=(Split("blocks.{block}.mlp.fc1.weight", ("blocks.{block}.mlp.fc1_g.weight", "blocks.{block}.mlp.fc1_x.weight")),
           Split("blocks.{block}.mlp.fc1.bias", ("blocks.{block}.mlp.fc1_g.bias", "blocks.{block}.mlp.fc1_x.bias"))),
)


def export_state_dict(model, family: Family, target: Mapping[str, torch.Tensor],
                      inert_zero: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s weights for the timm model whose state dict is ``target`` (built on the meta
    device: only its names and shapes are read): ``VITLAB`` and then ``family`` read backwards
    into the target's keys (``Family.restore``), checked name by name and shape by shape.

    Raises:
        WeightsError: a weight has no place in the target, a target tensor gets none, a shape
            differs, or a part timm keeps at zero is non-zero (and not ``inert_zero``).
    """
    keys = set(target)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = family.restore(VITLAB.restore(sd, into=keys), into=target, inert_zero=inert_zero)
    problems = [f"no place in timm's {family.name} model for {k}" for k in sorted(set(out) - keys)]
    problems += [f"nothing for timm's {k}" for k in sorted(keys - set(out))]
    problems += [f"{k}: {tuple(out[k].shape)} for timm's {tuple(target[k].shape)}"
                 for k in sorted(keys & set(out)) if tuple(out[k].shape) != tuple(target[k].shape)]
    if problems:  # pragma: no cover - a component with weights the tables do not know
        raise WeightsError("; ".join(problems))
    return out


# timm's Eva with AttentionRope's separate q / k / v, each with its bias (Sapiens2; grouped-query in
# some blocks, so the parts differ in size). Listed before EVA, whose marker these checkpoints match.
EVA_KEY_BIAS = Family(
    "eva_key_bias", marker=r"blocks\.\d+\.attn\.k_proj\.bias$",
    renames=EVA.renames,
    fused=(
        EVA.fused[0],  # q / k / v weights
        Fuse("blocks.{block}.attn.qkv.bias", ("blocks.{block}.attn.q_proj.bias", "blocks.{block}.attn.k_proj.bias",
                                              "blocks.{block}.attn.v_proj.bias")),
    ),
)

# timm's VLM towers (``qwen3.py``, ``deepseek.py``, ``gemma4.py``): the classifier holds the encoder under ``encoder.``
# (its head stays ``head``); the native projector is vitlab's ``pool``. Each table lists the
# classifier's names before the encoder's: export picks those its target has.
_TOWER = (("head.{rest}", "head.{rest}"),)
QWEN3 = Family(
    "qwen3_vit", marker=r"(encoder\.)?merger\.|encoder\.pos_embed$",
    renames=(*_TOWER, ("encoder.merger.{rest}", "pool.{rest}"), ("merger.{rest}", "pool.{rest}"),
             ("encoder.pos_embed", "pos_embed.weight"), ("pos_embed", "pos_embed.weight"),
             ("encoder.{rest}", "{rest}")),
)
DEEPSEEK = Family(  # the packed SwiGLU ``mlp.fc1`` is split on load (``weights``), packed on export (``deepseek``)
    "deepseek_vit", marker=r"(encoder\.)?aligner\.|encoder\.norm\.weight$",
    renames=(*_TOWER, ("encoder.aligner.{rest}", "pool.{rest}"), ("aligner.{rest}", "pool.{rest}"),
             ("encoder.{rest}", "{rest}")),
)
GEMMA4 = Family(  # the per-axis position tables are ``rope_axes``'s, the standardisation ``cell_avg``'s
    "gemma4_vit", marker=r"(encoder\.)?patch_embed\.(input_proj|position_embedding_table)",
    renames=(*_TOWER, ("encoder.patch_embed.input_proj.{rest}", "patch_embed.proj.{rest}"),
             ("patch_embed.input_proj.{rest}", "patch_embed.proj.{rest}"),
             ("encoder.patch_embed.position_embedding_table", "pos_embed.axis_table"),
             ("patch_embed.position_embedding_table", "pos_embed.axis_table"),
             ("encoder.std_{rest}", "pool.std_{rest}"), ("std_{rest}", "pool.std_{rest}"),
             ("encoder.{rest}", "{rest}")),
)

FAMILIES: tuple[Family, ...] = (DEIT_DISTILLED, CAIT, XCIT, BEIT, RELPOS, EVA_KEY_BIAS, EVA, NAFLEX, SAM, CONVIT,
                                QWEN3, DEEPSEEK, GEMMA4)


def family_of(keys: Iterable[str]) -> Family | None:
    """The family whose checkpoints have these keys, ``None`` for timm's plain ViT names."""
    keys = list(keys)
    return next((f for f in FAMILIES if f.matches(keys)), None)
