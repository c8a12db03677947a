"""timm's ``Hiera`` (Ryali et al. 2023; ``hiera``) <-> a staged vitlab spec.

Hiera is a vitlab model with ``stages``, its tokens kept in raster order (``components.hiera``
says why that is the same function as timm's unrolled order): a ``conv_padded`` patch embedding
(7x7, stride 4, padding 3), a ``learned`` position table (or ``abswin``), no prefix tokens, blocks
that attend in mask units (``window``, no shift, no bias) in the early stages and globally
(``mhsa``) in the later ones, and a ``q_pool`` transition into every later stage: timm's first
block of that stage, which pools queries and the projected residual and widens the tokens. The
average pool is normed after pooling (timm's ``ClNormMlpClassifierHead``).

timm numbers its blocks across the model (``blocks.{i}``): the ``HIERA`` table sends the first
block of each later stage to ``transitions.{stage}`` and the others to vitlab's ``blocks``. The
table is SAM 2's HieraDet's too (``hieradet_sam2``), whose checkpoints name their blocks alike.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import norm_layer, refuser
from ..family import Exporting, TimmFamily
from ..reader import Reader, common_and_layers, fmt_float
from .swin import at_text

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)$")
_TRANSITION = re.compile(r"transitions\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class StageOpeningBlocks(Family):
    """A family whose blocks are numbered across the model and whose first block of each later
    stage is vitlab's transition into it: timm's block i of stage s > 0 is ``transitions.{s}``
    when it opens the stage, else vitlab's block ``i - s``. ``depths`` are vitlab's stage depths
    (each later timm stage has one block more). A 4-D ``pos_embed`` (an image, abswin's global
    table) is the position component's ``weight``; a 3-D one stays for the learned-table rules."""

    def to_vitlab(self, key: str, depths: Sequence[int] | None = None) -> str:
        m = _BLOCK.match(key)
        if m is None or depths is None:
            return super().to_vitlab(key, depths)
        i, start = int(m.group(1)), 0
        for s, d in enumerate(depths):
            n = d + (s > 0)  # timm's stage s: the opening block and vitlab's d blocks
            if i < start + n:
                return f"transitions.{s}.{m.group(2)}" if s and i == start else f"blocks.{i - s}.{m.group(2)}"
            start += n
        return key

    def to_timm(self, key: str, into=None, depths: Sequence[int] | None = None) -> str:
        if key == "pos_embed.weight":
            return "pos_embed"
        if depths is not None and (m := _TRANSITION.match(key)):
            s = int(m.group(1))
            return f"blocks.{sum(depths[:s]) + s - 1}.{m.group(2)}"
        if depths is not None and (m := _BLOCK.match(key)):
            b = int(m.group(1))
            s = next(s for s in range(len(depths)) if b < sum(depths[: s + 1]))
            return f"blocks.{b + s}.{m.group(2)}"
        return super().to_timm(key, into, depths)

    def adapt(self, src, depths: Sequence[int] | None = None):
        out = super().adapt(src, depths)
        if "pos_embed" not in out or len(out.shape("pos_embed")) != 4:
            return out
        shapes = {("pos_embed.weight" if k == "pos_embed" else k): v for k, v in out.shapes.items()}
        return out.replaced(shapes, lambda k: out.get("pos_embed" if k == "pos_embed.weight" else k))


HIERA = StageOpeningBlocks(
    "hiera", marker=r"blocks\.\d+\.proj\.weight$|pos_embed_win(dow)?$",  # a widening projection, or abswin's window table
    renames=(("pos_embed_win", "pos_embed.window"), ("pos_embed_window", "pos_embed.window"),
             ("head.norm.{rest}", "pool.norm.{rest}"), ("head.fc.{rest}", "head.{rest}")),
)


def side(flat: int, where: str, fail) -> int:
    """The side of a square of ``flat`` cells (timm keeps windows and strides flattened)."""
    s = math.isqrt(flat)
    if s * s != flat:
        raise fail(f"non-square windows or strides ({flat} cells) at {where}")
    return s


# --- timm -> spec ------------------------------------------------------------------------------------

class HieraReader(Reader):
    """Reads a timm ``Hiera`` (its modules and shapes, never its name)."""

    def conv_stem(self, conv: nn.Module) -> dict:
        """The patch embedding: a square conv with stride and padding, as ``conv_padded``."""
        if type(conv) is not nn.Conv2d or conv.groups != 1 or tuple(conv.dilation) != (1, 1):
            raise self.unsupported(f"patch embedding {type(conv).__name__} (a 2-D convolution)")
        (k, k2), (s, s2), (p, p2) = conv.kernel_size, conv.stride, conv.padding
        if k != k2 or s != s2 or p != p2 or conv.padding_mode != "zeros":
            raise self.unsupported("non-square patch kernel, stride or padding")
        return {"patch_size": int(k), "in_chans": conv.in_channels,
                "patch_embed": {"name": "conv_padded", "params": {"stride": int(s), "padding": int(p),
                                                                  "bias": conv.bias is not None}}}

    def head(self, width: int) -> dict:
        from timm.layers import ClNormMlpClassifierHead

        head = self.m.head
        if type(head) is not ClNormMlpClassifierHead or head.pool_type != "avg" or not self.is_id(head.pre_logits):
            raise self.unsupported("head other than an average pool, a norm and a linear classifier")
        self.norm(head.norm, "head.norm")
        num_classes = 0
        if not self.is_id(head.fc):
            fc = self.linear(head.fc, "head.fc")
            if fc.bias is None or fc.in_features != width:
                raise self.unsupported("classifier head without bias or of another width")
            num_classes = fc.out_features
        return {"num_classes": num_classes, "drop_rate": fmt_float(head.drop.p),
                "pool": {"name": "avg", "params": {"norm": True}}, "final_norm": False}

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        """A block's attention that keeps the tokens: ``window`` over mask units, or ``mhsa``."""
        w = side(a.window_size, where, self.unsupported) if a.use_mask_unit_attn else 0
        return self.pooled_attention(a, where, dim, stride=1, window=w)

    @staticmethod
    def heads_of(a: nn.Module) -> int:
        return a.heads  # SAM 2's MultiScaleAttention: num_heads

    def pooled_attention(self, a: nn.Module, where: str, dim: int, stride: int, window: int) -> dict:
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if qkv.bias is None or proj.bias is None or qkv.out_features != 3 * dim or proj.out_features != dim:
            raise self.unsupported(f"attention without biases or of another width at {where}")
        params = {"qkv_bias": True, "proj_bias": True}
        if stride == 1:
            sel = {"name": "window", "params": {**params, "window_size": window}} if window else {"name": "mhsa", "params": params}
            return {**sel, "heads": self.heads_of(a)}
        return {"heads": self.heads_of(a), "stride": stride, "window_size": window}

    def block_parts(self, b: nn.Module, where: str) -> tuple[dict, float | None]:
        """The MLP and norms of a timm ``HieraBlock``, and its layer scale init."""
        mlp = self.mlp(b.mlp, f"{where}.mlp", b.dim_out)
        self.norm(b.norm1, f"{where}.norm1")
        self.norm(b.norm2, f"{where}.norm2")
        ls1, ls2 = self.layer_scale(b.ls1, f"{where}.ls1"), self.layer_scale(b.ls2, f"{where}.ls2")
        if (ls1 is None) != (ls2 is None):
            raise self.unsupported(f"layer scale on only one branch at {where}")
        return mlp, ls1

    def stages(self, m: nn.Module, q_side: int) -> tuple[list[dict], list[dict], list[dict]]:
        """The stages, each vitlab block's attention and MLP read (in order)."""
        from timm.models.hiera import HieraBlock

        ends, stages, attns, mlps, start = list(m.stage_ends), [], [], [], 0
        for s, end in enumerate(ends):
            stage: dict[str, Any] = {}
            for i in range(start, end + 1):
                b, where = m.blocks[i], f"blocks.{i}"
                if type(b) is not HieraBlock:
                    raise self.unsupported(f"block type {type(b).__name__} at {where}")
                mlp, ls = self.block_parts(b, where)
                a = b.attn
                if s and i == start:  # the block opening the stage: the transition into it
                    stride = side(a.q_stride, f"{where}.attn", self.unsupported)
                    window = side(a.window_size * a.q_stride, where, self.unsupported) if a.use_mask_unit_attn else 0
                    read = self.pooled_attention(a, f"{where}.attn", b.dim_out, stride, window)
                    if stride not in (1, q_side) or b.dim == b.dim_out:
                        raise self.unsupported(f"a stage that keeps the width at {where}")
                    stage = {"embed_dim": b.dim_out, "num_heads": a.heads, "transition": {"name": "q_pool", "params": {
                        "stride": stride, "window_size": window, "residual": "proj" if b.proj is not None else "pool",
                        "init_values": ls}}}
                    if b.proj is not None:
                        self.linear(b.proj, f"{where}.proj")
                    mlps.append(("transition", mlp, b.dim_out, where))
                    continue
                if b.dim != b.dim_out or a.q_stride != 1:
                    raise self.unsupported(f"a width change or pooling inside a stage at {where}")
                attns.append(self.attention(a, f"{where}.attn", b.dim_out))
                mlps.append((ls, mlp, b.dim_out, where))
                if i == start:
                    stage = {"embed_dim": b.dim_out, "num_heads": a.heads}
            n = end + 1 - start - (s > 0)
            if n < 1:
                raise self.unsupported(f"stage {s} with no block besides the one that opens it")
            stages.append({"depth": n, **stage})
            start = end + 1
        return stages, attns, mlps

    def positions(self) -> dict:
        m = self.m
        if m.pos_embed_win is not None:
            return {"name": "abswin", "params": {"global_size": list(m.pos_embed.shape[-2:]),
                                                 "window_size": int(m.pos_embed_win.shape[-1]), "antialias": True}}
        if m.pos_embed is None:
            raise self.unsupported("separate spatial and temporal position embeddings (sep_pos_embed)")
        return {"name": "learned"}

    def spec(self) -> ViTSpec:
        from timm.models.hiera import Hiera, Unroll

        m = self.m
        if type(m) is not Hiera:
            raise self.unsupported(f"Hiera subclass {type(m).__name__}")
        if len(m.patch_stride) != 2 or type(m.unroll) is not Unroll:
            raise self.unsupported(f"{len(m.patch_stride)}-D inputs (video)")
        q_side = side(math.prod(m.q_stride), "q_stride", self.unsupported)
        mu = m.mask_unit_size
        if len(set(m.q_stride)) != 1 or len(set(mu)) != 1:
            raise self.unsupported(f"non-square q_stride {m.q_stride} or mask units {mu}")
        # a mask unit is a window of the grid when it is a whole number of unrolled stride groups
        if q_side > 1 and (mu[0] > q_side ** (len(m.stage_ends) - 1) or q_side ** round(math.log(mu[0], q_side)) != mu[0]):
            raise self.unsupported(f"mask units {mu} that are not a power of q_stride {m.q_stride}")
        if m.patch_drop_rate:
            raise self.unsupported("patch dropout by mask units (patch_drop_rate)")
        data: dict[str, Any] = {"name": self.name, **self.conv_stem(m.patch_embed.proj), "class_token": False,
                                "reg_tokens": 0, "pos_embed": self.positions(), "pre_norm": False,
                                "transition": {"name": "q_pool"}}
        data["img_size"] = [int(t * s) for t, s in zip(m.tokens_spatial_shape, m.patch_stride)]
        stages, attns, mlps = self.stages(m, q_side)
        data.update(self.head(stages[-1]["embed_dim"]))
        return self.finish_stages(data, stages, attns, mlps)

    def finish_stages(self, data: dict, stages: list[dict], attns: list[dict], mlps: list[tuple]) -> ViTSpec:
        """The stages, the blocks' attention as the recipe's plus ``layers``, the MLP, the norm."""
        if data["img_size"][0] == data["img_size"][1]:
            data["img_size"] = data["img_size"][0]
        first_mlp = mlps[0][1]
        inits = {ls for ls, *_ in mlps if ls != "transition"}
        if len(inits) != 1:
            raise self.unsupported("blocks with and without layer scale")
        for _, mlp, _, where in mlps:
            if {k: v for k, v in mlp.items() if k != "hidden"} != {k: v for k, v in first_mlp.items() if k != "hidden"}:
                raise self.unsupported(f"MLPs that differ at {where}")
        ratios = {self.mlp_ratio(mlp["hidden"], f"{where}.mlp", dim) for _, mlp, dim, where in mlps}
        if len(ratios) != 1:
            raise self.unsupported("MLP ratios that differ between blocks")
        data["attention"], layers = common_and_layers(
            [{"name": a["name"], "params": a["params"]} for a in attns], "attention", at_text)
        data.update(stages=stages, layers=layers, mlp_ratio=ratios.pop(), block={"name": "prenorm", "params": {
            "init_values": inits.pop()}}, mlp={"name": first_mlp["name"], "params": first_mlp["params"]})
        data["norm"] = self.norm_selection()
        data["proj_drop_rate"] = 0.0
        last = self.m.blocks[-1]
        data["drop_path_rate"] = fmt_float(getattr(last.drop_path1, "drop_prob", 0.0))
        return self.validated(data)


# --- spec -> timm -----------------------------------------------------------------------------------

def differs(registry, kind: str, sel, free: set[str], **want: Any) -> bool:
    """Whether selection ``sel`` has a param other than its component's default (or ``want``),
    besides the ``free`` ones timm takes as arguments."""
    defaults = registry.get(kind, sel.name).cls.Params(**want).model_dump(mode="json")
    return any(v != defaults.get(k) for k, v in sel.params.items() if k not in free)


def uses_q_pool(spec: ViTSpec) -> bool:
    return spec.stages is not None and len(spec.stages) > 1 and all(
        p.transition.name == "q_pool" for p in spec.stage_plans()[1:])


def _claims(spec: ViTSpec) -> bool:
    return uses_q_pool(spec) and (spec.pos_embed.name != "abswin" or spec.pos_embed.params.get("antialias", True))


def stage_windows(spec: ViTSpec, ex: Exporting, fail) -> list[int]:
    """Each stage's one attention window side (0: global), refused when blocks of a stage differ
    other than so, or in anything but their attention."""
    plans, out = spec.block_plans(), []
    for stage in spec.stage_plans():
        sels = [plans[i].selections["attention"] for i in stage.blocks]
        if any(plans[i].selections[k] != spec.selection(k) for i in stage.blocks for k in ("mlp", "norm", "block")):
            raise fail(f"per-block overrides other than attention (stage {stage.index})")
        if any(plans[i].mlp_ratio != spec.mlp_ratio for i in stage.blocks):
            raise fail(f"MLP ratios that differ (stage {stage.index})")
        windows = set()
        for sel in sels:
            if sel.name not in ("window", "mhsa") or differs(ex.registry, "attention", sel, {"window_size"}):
                raise fail(f"attention {sel.name} {sel.params} in stage {stage.index} (Hiera: window or mhsa "
                           "with their defaults)")
            windows.add(sel.params["window_size"] if sel.name == "window" else 0)
        if len(windows) != 1:
            raise fail(f"window and global attention mixed within stage {stage.index}")
        out.append(windows.pop())
    return out


def pooling_and_widths(spec: ViTSpec, fail) -> tuple[int, int, float, float]:
    """timm's ``q_stride`` side, ``q_pool`` (how many first transitions pool), ``dim_mul`` and
    ``head_mul`` of a spec's ``q_pool`` transitions and stages (Hiera's and HieraDet's)."""
    plans = spec.stage_plans()
    strides = [p.transition.params["stride"] for p in plans[1:]]
    q = strides[0]
    q_pool = sum(s > 1 for s in strides)
    if any(s != q for s in strides[:q_pool]) or any(s != 1 for s in strides[q_pool:]) or q < 2:
        raise fail(f"q_pool strides {strides} (Hiera: one stride, pooling the first stages)")
    widths, heads = [p.embed_dim for p in plans], [p.num_heads for p in plans]
    dim_mul, head_mul = widths[1] / widths[0], heads[1] / heads[0]
    for i in range(1, len(plans)):
        if widths[i] != int(widths[i - 1] * dim_mul) or heads[i] != int(heads[i - 1] * head_mul):
            raise fail(f"stage widths {widths} and heads {heads} (Hiera: one factor for each)")
    return q, q_pool, dim_mul, head_mul


def hiera_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Hiera`` for a staged spec with ``q_pool`` transitions."""
    fail = refuser(spec, "Hiera")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or spec.final_norm or spec.dynamic_img_size:
        raise fail("prefix tokens, pre_norm, a final norm or dynamic_img_size (Hiera: none; the head norms)")
    if spec.pool.name != "avg" or not spec.pool.params.get("norm") or spec.block.name != "prenorm":
        raise fail(f"pool '{spec.pool.name}' or block '{spec.block.name}' (Hiera: avg with its norm, prenorm)")
    pe, mlp = spec.patch_embed, spec.mlp
    if pe.name != "conv_padded" or not pe.params.get("bias", True):
        raise fail(f"patch embedding '{pe.name}' (Hiera: conv_padded with bias)")
    if mlp.name != "mlp" or differs(ex.registry, "mlp", mlp, set(), act="gelu"):
        raise fail(f"mlp '{mlp.name}' {mlp.params} (Hiera: mlp with gelu and biases)")
    windows = stage_windows(spec, ex, fail)
    plans = spec.stage_plans()
    trans = [p.transition.params for p in plans[1:]]
    q, q_pool, dim_mul, head_mul = pooling_and_widths(spec, fail)
    if len({t["residual"] for t in trans}) != 1 or len({t["init_values"] for t in trans} | {
            spec.block.params.get("init_values")}) != 1:
        raise fail("transitions that differ in their residual or layer scale from each other or the blocks")
    # timm's mask unit: stage 0's window, or the first transition's; it shrinks by q with each pool
    mu = windows[0] or trans[0]["window_size"]
    mask_unit_attn, expect_t = [], []
    for s in range(len(plans)):
        unit = mu // q ** min(s, q_pool) if mu else 0
        mask_unit_attn.append(bool(windows[s]))
        if windows[s] and windows[s] != unit:
            raise fail(f"window {windows[s]} in stage {s} (Hiera: the mask unit {mu} shrunk by each pool, {unit})")
    for s, t in enumerate(trans, start=1):  # the opening block attends as the stage before it
        want = (mu // q ** min(s - 1, q_pool)) if mask_unit_attn[s - 1] else 0
        if t["window_size"] != want:
            raise fail(f"q_pool window_size {t['window_size']} into stage {s} (Hiera: {want}, the previous stage's)")
    abswin = spec.pos_embed.name == "abswin"
    if spec.pos_embed.name not in ("learned", "abswin"):
        raise fail(f"pos_embed '{spec.pos_embed.name}' (Hiera: learned or abswin)")
    kw = dict(
        img_size=tuple(spec.img_hw), in_chans=spec.in_chans, embed_dim=plans[0].embed_dim,
        num_heads=plans[0].num_heads,
        num_classes=spec.num_classes, global_pool="avg", stages=tuple(p.depth + (p.index > 0) for p in plans),
        q_pool=q_pool, q_stride=(q, q), mask_unit_size=(mu or q ** (len(plans) - 1),) * 2,
        mask_unit_attn=tuple(mask_unit_attn), use_expand_proj=trans[0]["residual"] == "proj", dim_mul=dim_mul,
        head_mul=head_mul, patch_kernel=tuple(spec.patch_hw), patch_stride=(pe.params["stride"],) * 2,
        patch_padding=(pe.params["padding"],) * 2, mlp_ratio=spec.mlp_ratio, drop_path_rate=spec.drop_path_rate,
        init_values=trans[0]["init_values"], norm_layer=norm_layer(spec, fail), drop_rate=spec.drop_rate,
    )
    if abswin:
        p = spec.pos_embed.params
        if p["window_size"] != kw["mask_unit_size"][0]:
            raise fail(f"abswin window {p['window_size']} other than the mask unit {mu}")
        g = p["global_size"]
        kw.update(abs_win_pos_embed=True, global_pos_size=tuple(g) if isinstance(g, (list, tuple)) else (g, g))
    return kw


def staged_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A staged vitlab Hiera's (or HieraDet's) weights in timm's names (``HIERA`` read backwards,
    into the names of the timm model it goes back to)."""
    spec = model.spec
    with torch.device("meta"):
        target = ex.timm_class(spec)(**ex.kwargs(spec)).state_dict()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return HIERA.restore(sd, into=set(target), depths=[p.depth for p in spec.stage_plans()])


FAMILY = TimmFamily(
    "hiera", classes=("timm.models.hiera.Hiera",), reader=HieraReader, claims=_claims,
    timm_class="timm.models.hiera.Hiera", kwargs=hiera_kwargs, state_dict=staged_state_dict, tables=(HIERA,),
)
