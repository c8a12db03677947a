"""timm's ``GlobalContextVit`` (GCViT, Hatamizadeh et al. 2022; ``gcvit``) <-> a staged vitlab spec.

GCViT is a vitlab model with ``stages``: a ``gcvit_stem`` patch embedding (a 3x3 convolution of
stride 2 and GCViT's downsampler: 4 px patches), no position embedding and no prefix tokens,
``gcvit_down`` transitions into every stage after the first, and ``gcvit`` blocks of ``gcvit``
attention in windows with a relative position table, whose odd blocks in each stage take their
queries from the stage's global query (``global_query``, written as ``layers``). The first block
of each stage makes those global tokens (``global_size``: the stage's window). The norm that ends
the last stage is the final norm; an ``adaptive_avg`` pool (timm pools NCHW) feeds the classifier.

The state-dict differences are the ``GCVIT`` table: the stem (``stem``), blocks and downsampling
per stage (``stages.{stage}.blocks.{j}``, ``stages.{stage}.downsample``), each stage's global query
generator (``stages.{stage}.global_block``: vitlab's first block of the stage), the last stage's
norm (vitlab's final ``norm``) and the classifier (``head.fc``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Container, Sequence

from torch import nn

from ...components.gcvit import global_levels, se_width
from ...spec import ViTSpec
from ..export import norm_layer, pair, refuser
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, fmt_float
from ..staged import StagedReader, drop_path_of, stage_values, staged_state_dict
from .pvt_v2 import StageNormFamily


def _starts(depths: Sequence[int]) -> list[int]:
    return [sum(depths[:s]) for s in range(len(depths))]


@dataclass(frozen=True)
class GlobalBlockFamily(StageNormFamily):
    """PVTv2's table (the last stage's ``norm`` is the final ``norm``) with what the templates cannot
    say: ``stages.{stage}.global_block`` is vitlab's ``blocks.{first block of the stage}.global_block``."""

    def to_vitlab(self, key: str, depths: Sequence[int] | None = None) -> str:
        if depths is not None and (m := re.match(r"stages\.(\d+)\.global_block\.(.+)$", key)) and int(m[1]) < len(depths):
            return f"blocks.{_starts(depths)[int(m[1])]}.global_block.{m[2]}"
        return super().to_vitlab(key, depths)

    def to_timm(self, key: str, into: Container[str] | None = None, depths: Sequence[int] | None = None) -> str:
        if depths is not None and (m := re.match(r"blocks\.(\d+)\.global_block\.(.+)$", key)):
            if int(m[1]) in _starts(depths):
                return f"stages.{_starts(depths).index(int(m[1]))}.global_block.{m[2]}"
        return super().to_timm(key, into, depths)


GCVIT = GlobalBlockFamily(
    "gcvit", marker=r"stages\.\d+\.global_block\.",
    renames=(("stem.{rest}", "patch_embed.{rest}"),
             ("stages.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
             ("stages.{stage}.downsample.{rest}", "transitions.{stage}.down.{rest}"),
             ("head.fc.{rest}", "head.{rest}")),
)


# --- timm -> spec ------------------------------------------------------------------------------------

class GcvitReader(StagedReader):
    """Reads a timm ``GlobalContextVit`` instance (its modules and shapes, never its name)."""

    timm_module, model_cls = "timm.models.gcvit", "GlobalContextVit"

    def conv(self, c: nn.Module, where: str, want: tuple, bias: bool, groups: int = 1) -> None:
        """An ``nn.Conv2d`` of square (kernel, stride, padding) ``want``, refused otherwise."""
        geometry = (c.kernel_size, c.stride, c.padding) if type(c) is nn.Conv2d else None
        if (geometry != tuple((v, v) for v in want) or (c.bias is not None) != bias or c.groups != groups
                or c.padding_mode != "zeros" or tuple(c.dilation) != (1, 1)):
            raise self.unsupported(f"convolution other than GCViT's {want[0]}x{want[0]} (stride {want[1]}) at {where}")

    def ln2d(self, mod: nn.Module, where: str) -> float:
        from timm.layers import LayerNorm2d

        if type(mod) is not LayerNorm2d or not mod.elementwise_affine or mod.bias is None:
            raise self.unsupported(f"norm {type(mod).__name__} other than LayerNorm2d at {where}")
        return fmt_float(mod.eps)

    def mbconv(self, mb: nn.Module, where: str, dim: int) -> None:
        """timm's ``MbConvBlock`` as vitlab's: depthwise 3x3, GELU, SE at 1/4 without biases, 1x1."""
        from timm.layers.squeeze_excite import SEModule

        if not self.is_timm(mb, "MbConvBlock") or type(mb.se) is not SEModule or mb.conv_dw.out_channels != dim:
            raise self.unsupported(f"MBConv other than GCViT's (depthwise, GELU, SE, pointwise) at {where}")
        self.conv(mb.conv_dw, f"{where}.conv_dw", (3, 1, 1), False, groups=dim)
        self.conv(mb.conv_pw, f"{where}.conv_pw", (1, 1, 0), False)
        se = mb.se
        if (se.fc1.out_channels != se_width(dim) or se.fc1.bias is not None or se.add_maxpool
                or not self.is_id(se.bn) or type(se.gate).__name__ != "Sigmoid"):
            raise self.unsupported(f"squeeze-excitation other than 1/4 width, no bias, sigmoid at {where}.se")
        for w, act in ((where, mb.act), (f"{where}.se", se.act)):
            if self.act(act, f"{w}.act") != "gelu":
                raise self.unsupported(f"activation other than GELU at {w}")

    def downsample(self, d: nn.Module, where: str, dim: int) -> tuple[int, float]:
        """A ``Downsample2d`` at width ``dim`` in: (its width out, its norms' eps)."""
        if not self.is_timm(d, "Downsample2d"):
            raise self.unsupported(f"downsampling {type(d).__name__} at {where}")
        self.mbconv(d.conv_block, f"{where}.conv_block", dim)
        self.conv(d.reduction, f"{where}.reduction", (3, 2, 1), False)
        eps = {self.ln2d(d.norm1, f"{where}.norm1"), self.ln2d(d.norm2, f"{where}.norm2")}
        if len(eps) != 1:
            raise self.unsupported(f"norms of different eps at {where}")
        return d.reduction.out_channels, eps.pop()

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        if not self.is_timm(a, "WindowAttentionGlobal"):
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        wh, ww = a.window_size
        if wh != ww or a.rel_pos.prefix_tokens or type(a.rel_pos).__name__ != "RelPosBias":
            raise self.unsupported(f"{wh}x{ww} windows or a position bias other than timm's RelPosBias at {where}")
        if qkv.out_features != (2 if a.use_global else 3) * dim or proj.out_features != dim:
            raise self.unsupported(f"attention width other than the stage's {dim} at {where}")
        return {"heads": a.num_heads, "proj_drop": a.proj_drop.p, "name": "gcvit",
                "params": {"window_size": wh, "global_query": bool(a.use_global), "qkv_bias": qkv.bias is not None,
                           "proj_bias": proj.bias is not None, "attn_drop": fmt_float(a.attn_drop.p)}}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        if not self.is_timm(b, "GlobalContextVitBlock"):
            raise self.unsupported(f"block type {type(b).__module__}.{type(b).__name__} at {where}")
        attn, mlp = self.parts(b, where, dim=dim)
        ls1, ls2 = self.layer_scale(b.ls1, f"{where}.ls1"), self.layer_scale(b.ls2, f"{where}.ls2")
        if ls1 != ls2:
            raise self.unsupported(f"layer scale on only one branch at {where}")
        return BlockRead(attn, mlp, {"name": "gcvit", "params": {"init_values": ls1, "global_size": 0}}, drop_path_of(b))

    def spec(self) -> ViTSpec:
        m = self.own_model()
        stem = m.stem
        if not self.is_timm(stem, "Stem"):
            raise self.unsupported(f"stem {type(stem).__name__}")
        s = stem.conv1.stride[0]
        self.conv(stem.conv1, "stem.conv1", (3, s, 1), True)
        width = stem.conv1.out_channels
        _, eps = self.downsample(stem.down, "stem.down", width)
        feat = tuple(m.stages[0].feat_size)
        data: dict[str, Any] = {
            "name": self.name, "img_size": feat[0] * 2 * s if feat[0] == feat[1] else [g * 2 * s for g in feat],
            "patch_size": 2 * s, "in_chans": stem.conv1.in_channels,
            "patch_embed": {"name": "gcvit_stem", "params": {"eps": eps}},
            "class_token": False, "reg_tokens": 0, "pos_embed": {"name": "none"}, "pool": {"name": "adaptive_avg"},
            "pre_norm": False, "final_norm": True, "transition": {"name": "gcvit_down", "params": {"eps": eps}},
        }
        stages, blocks, openers = [], [], []
        for i, st in enumerate(m.stages):
            where = f"stages.{i}"
            if not self.is_timm(st, "GlobalContextVitStage"):
                raise self.unsupported(f"stage {type(st).__name__} at {where}")
            stage: dict[str, Any] = {}
            if i:
                width, e = self.downsample(st.downsample, f"{where}.downsample", width)
                if e != eps:
                    raise self.unsupported(f"downsampler norms of another eps than the stem's at {where}")
            elif not self.is_id(st.downsample):
                raise self.unsupported("downsampling before the first stage")
            if not self.is_id(st.global_norm):
                raise self.unsupported(f"a norm of the global query (global_norm) at {where}")
            if i == len(m.stages) - 1:
                self.norm(st.norm, f"{where}.norm")
            elif not self.is_id(st.norm):
                raise self.unsupported(f"a norm closing stage {i} before the last")
            first = len(blocks)
            stages.append({**self.stage(i, st.blocks, width, f"{where}.blocks", blocks), **stage})
            w = blocks[first][0].attn["params"]["window_size"]
            self.global_block(st.global_block, f"{where}.global_block", width, tuple(st.feat_size), w)
            openers.append((first, w))
        self.alike(blocks, "window, global query, heads or width")
        for first, w in openers:  # each stage's first block makes its global query tokens
            blocks[first][0].block["params"]["global_size"] = w
        attn = [{"name": "gcvit", "params": b.attn["params"]} for b, _, _ in blocks]
        data["attention"], layers = self.per_block("attention", attn)
        data["mlp_ratio"], ratio_layers = self.per_block("mlp_ratio", self.mlp_ratios(blocks))
        data["block"], block_layers = self.per_block("block", [b.block for b, _, _ in blocks])
        first = blocks[0][0]
        data.update(stages=stages, layers=layers + ratio_layers + block_layers,
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]})
        data.update(self.classifier_head(m.head))
        return self.finish_staged(data, blocks)

    def global_block(self, fb: nn.Module, where: str, dim: int, grid: tuple[int, int], window: int) -> None:
        """A ``FeatureBlock``: as many MBConv + max pool levels as pool ``grid`` to ``window``."""
        levels = global_levels(grid, window)
        want = [n for i in range(max(levels, 1)) for n in (f"conv{i + 1}", f"pool{i + 1}")[: 1 + (i < levels)]]
        if not self.is_timm(fb, "FeatureBlock") or [n for n, _ in fb.blocks.named_children()] != want:
            raise self.unsupported(f"global query generator other than {levels} MBConv + max pool levels at {where}")
        for n, mod in fb.blocks.named_children():
            if n.startswith("conv"):
                self.mbconv(mod, f"{where}.blocks.{n}", dim)
            elif type(mod) is not nn.MaxPool2d or (mod.kernel_size, mod.stride, mod.padding) != (3, 2, 1):
                raise self.unsupported(f"pooling other than a 3x3 max pool of stride 2 at {where}.blocks.{n}")


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return spec.stages is not None and spec.patch_embed.name == "gcvit_stem"


def gcvit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``GlobalContextVit`` for a staged spec."""
    fail = refuser(spec, "GlobalContextVit")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or not spec.final_norm or spec.dynamic_img_size:
        raise fail("prefix tokens, pre_norm, dynamic_img_size or no final norm (GCViT: none, none, no, the last "
                   "stage's norm)")
    eps = spec.patch_embed.params.get("eps", 1e-5)
    if spec.patch_hw != (4, 4) or spec.pos_embed.name != "none" or spec.pool.name != "adaptive_avg" or spec.pool.params.get("norm"):
        raise fail(f"patch size {spec.patch_size}, pos_embed '{spec.pos_embed.name}' or pool '{spec.pool.name}' "
                   "(GCViT: 4, none, adaptive_avg)")
    if spec.norm.params.get("eps") != eps:
        raise fail("stem and downsampler norms of another eps than the blocks' (timm's norm_eps is one)")
    plans, stage_plans = spec.block_plans(), spec.stage_plans()
    if any(p.transition.name != "gcvit_down" or p.transition.params.get("eps", 1e-5) != eps for p in stage_plans[1:]):
        raise fail("transitions other than gcvit_down with the stem's eps")
    for p in plans:
        for kind in ("block", "attention", "mlp"):
            if p.selections[kind].name != {"block": "gcvit", "attention": "gcvit", "mlp": "mlp"}[kind]:
                raise fail(f"{kind} '{p.selections[kind].name}' at block {p.index} (GCViT: gcvit, gcvit, mlp)")
    windows = stage_values(spec, fail, "window size", lambda p: p.selections["attention"].params["window_size"])
    for stage, w in zip(stage_plans, windows):
        for j, i in enumerate(stage.blocks):
            a, b = plans[i].selections["attention"].params, plans[i].selections["block"].params
            if a["global_query"] != bool(j % 2) or b["global_size"] != (w if j == 0 else 0):
                raise fail(f"block {i}'s global query (GCViT: global_query on a stage's odd blocks, the stage's first "
                           "block makes it at global_size = its window)")
    common = {repr({k: v for k, v in p.selections["attention"].params.items() if k not in ("window_size", "global_query")})
              for p in plans}
    mlps = {repr(p.selections["mlp"].params) for p in plans}
    scales = {p.selections["block"].params["init_values"] for p in plans}
    ratios = {p.mlp_ratio for p in plans}
    if len(common) != 1 or len(mlps) != 1 or len(scales) != 1 or len(ratios) != 1:
        raise fail("attention or MLP params, layer scales or MLP ratios that differ between blocks")
    a, m = plans[0].selections["attention"].params, plans[0].selections["mlp"].params
    if not a["proj_bias"] or m.get("act", "gelu") != "gelu" or not m.get("bias", True) or m.get("norm"):
        raise fail(f"attention {a} or MLP {m} (GCViT: output bias, GELU, biases, no norm)")
    widths = [st.embed_dim for st in spec.stages]
    if widths != [widths[0] * 2**i for i in range(len(widths))]:
        raise fail(f"stage widths {widths} (GCViT doubles the width at every stage)")
    norm_layer(spec, fail)
    return dict(
        in_chans=spec.in_chans, num_classes=spec.num_classes, global_pool="avg", img_size=pair(spec.img_size),
        window_size=tuple(windows), embed_dim=widths[0], depths=tuple(st.depth for st in spec.stages),
        num_heads=tuple(st.num_heads for st in spec.stages), mlp_ratio=ratios.pop(), qkv_bias=a["qkv_bias"],
        layer_scale=scales.pop(), drop_rate=spec.drop_rate, proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=a.get("attn_drop", 0.0), drop_path_rate=spec.drop_path_rate, norm_eps=eps,
    )


FAMILY = TimmFamily(
    "gcvit", classes=("timm.models.gcvit.GlobalContextVit",), reader=GcvitReader,
    claims=_claims, timm_class="timm.models.gcvit.GlobalContextVit", kwargs=gcvit_kwargs,
    state_dict=staged_state_dict(GCVIT, gcvit_kwargs), tables=(GCVIT,),
)
