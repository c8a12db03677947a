"""timm's ``DaVit`` (DaViT, Ding et al. 2022, and Florence-2's vision towers; ``davit``) <-> a staged vitlab spec.

DaViT is a vitlab model with ``stages``: an ``overlap`` patch embedding (a 7x7 convolution of
stride 4, padding 3, then a LayerNorm of its own), no position embedding and no prefix tokens,
``norm_conv`` transitions into every stage after the first (the norm, then a 2x2 convolution of
stride 2; 3x3, padding 1 in Florence-2's ``_fl`` towers), and ``prenorm_cpe`` blocks (a depthwise
convolution added before each branch) whose attention alternates: ``window`` (no shift, no bias)
on a stage's even blocks, ``channel`` on its odd ones (``layers``, ``at: "1-11:2"``). No final
norm: an ``adaptive_avg`` pool with the norm after it feeds the classifier (timm's
``NormMlpClassifierHead``). timm takes any image size: the spec is ``dynamic_img_size`` at the
model's default input size (timm's stem pads an image to a multiple of 4 first; vitlab's does not,
the same on such sizes).

The state-dict differences are the ``DAVIT`` table: timm keeps each stage's blocks in pairs
(``stages.{stage}.blocks.{j}.{0|1}``, or ``spatial_block`` / ``channel_block`` with
``named_blocks``), which are vitlab's blocks ``2 j`` and ``2 j + 1`` of the stage; the stem
(``stem``), the downsampling (``stages.{stage}.downsample``) and the head's norm (``head.norm``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Container, Sequence

from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import refuser
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, fmt_float
from ..staged import StagedReader, conv_geometry, drop_path_of, staged_state_dict

_PAIRED = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(0|1|spatial_block|channel_block)\.(.+)$")
_FLAT = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class PairedBlocks(Family):
    """A table whose stages keep their blocks in (spatial, channel) pairs: timm's pair j, part k is
    the stage's block 2 j + k (an index the templates cannot say); written back unnamed."""

    def to_vitlab(self, key: str, depths: Sequence[int] | None = None) -> str:
        if (m := _PAIRED.match(key)) is not None:
            part = 1 if m[3] in ("1", "channel_block") else 0
            key = f"stages.{m[1]}.blocks.{2 * int(m[2]) + part}.{m[4]}"
        return super().to_vitlab(key, depths)

    def to_timm(self, key: str, into: Container[str] | None = None, depths: Sequence[int] | None = None) -> str:
        key = super().to_timm(key, None, depths)
        if (m := _FLAT.match(key)) is not None:
            return f"stages.{m[1]}.blocks.{int(m[2]) // 2}.{int(m[2]) % 2}.{m[3]}"
        return key


DAVIT = PairedBlocks(
    "davit", marker=r"stages\.\d+\.blocks\.\d+\.(0|spatial_block)\.cpe1\.",
    renames=(("stem.conv.{rest}", "patch_embed.proj.{rest}"), ("stem.norm.{rest}", "patch_embed.norm.{rest}"),
             ("stages.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
             ("stages.{stage}.downsample.{rest}", "transitions.{stage}.{rest}"),
             ("head.norm.{rest}", "pool.norm.{rest}"), ("head.fc.{rest}", "head.{rest}")),
)


# --- timm -> spec ------------------------------------------------------------------------------------

class DavitReader(StagedReader):
    """Reads a timm ``DaVit`` instance (its modules and shapes, never its name)."""

    timm_module, model_cls = "timm.models.davit", "DaVit"

    def norm2d(self, mod: nn.Module, where: str, own: bool = False) -> float:
        """timm's ``LayerNorm2d`` (over the channels of an image): read as the recipe's LayerNorm
        (or, ``own``, a component's own): its eps."""
        from timm.layers import LayerNorm2d

        if type(mod) is not LayerNorm2d or not mod.elementwise_affine or mod.bias is None:
            raise self.unsupported(f"norm {type(mod).__name__} other than LayerNorm2d with weight and bias at {where}")
        if not own:
            self.norms[where] = ("layernorm", (("bias", True), ("eps", float(mod.eps))))
        return fmt_float(mod.eps)

    def cpe(self, c: nn.Module, where: str, dim: int) -> tuple[int, bool]:
        """timm's ``ConvPosEnc``: (its kernel, whether GELU follows the convolution)."""
        p = c.proj
        if (not self.is_timm(c, "ConvPosEnc") or type(p) is not nn.Conv2d or p.groups != dim or p.bias is None
                or p.out_channels != dim or p.kernel_size[0] != p.kernel_size[1] or p.kernel_size[0] % 2 == 0
                or tuple(p.padding) != (p.kernel_size[0] // 2,) * 2 or tuple(p.stride) != (1, 1)):
            raise self.unsupported(f"position encoding other than a same-size depthwise convolution at {where}")
        if not self.is_id(c.act) and (type(c.act) is not nn.GELU or c.act.approximate != "none"):
            raise self.unsupported(f"position encoding activation {type(c.act).__name__} at {where}.act")
        return p.kernel_size[0], not self.is_id(c.act)

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if qkv.out_features != 3 * dim or proj.in_features != dim or proj.out_features != dim:
            raise self.unsupported(f"attention width other than the stage's {dim} at {where}")
        params: dict[str, Any] = {"qkv_bias": qkv.bias is not None, "proj_bias": proj.bias is not None}
        if self.is_timm(a, "WindowAttention"):
            w = tuple(int(s) for s in a.window_size)
            if w[0] != w[1]:
                raise self.unsupported(f"{w[0]}x{w[1]} windows (vitlab's windows are square) at {where}")
            return {"name": "window", "heads": a.num_heads, "proj_drop": 0.0, "params": {**params, "window_size": w[0]}}
        if self.is_timm(a, "ChannelAttention"):
            return {"name": "channel", "heads": a.num_heads, "proj_drop": 0.0, "params": {**params, "v2": False}}
        if self.is_timm(a, "ChannelAttentionV2") and a.dynamic_scale:
            return {"name": "channel", "heads": a.groups, "proj_drop": 0.0, "params": {**params, "v2": True}}
        raise self.unsupported(f"attention layer {type(a).__name__} (or v2 without dynamic_scale) at {where}")

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        if not (self.is_timm(b, "SpatialBlock") or self.is_timm(b, "ChannelBlock")) or b.mlp is None:
            raise self.unsupported(f"block {type(b).__name__} (or one without its MLP, ffn=False) at {where}")
        attn, mlp = self.parts(b, where, dim=dim)
        cpe = {self.cpe(b.cpe1, f"{where}.cpe1", dim), self.cpe(b.cpe2, f"{where}.cpe2", dim)}
        if len(cpe) != 1:
            raise self.unsupported(f"position encodings that differ in one block at {where}")
        k, act = cpe.pop()
        return BlockRead(attn, mlp, {"name": "prenorm_cpe", "params": {"init_values": None, "cpe_kernel": k,
                                                                       "cpe_act": act}}, drop_path_of(b))

    def downsample(self, down: nn.Module, s: int, in_dim: int) -> tuple[int, dict]:
        """timm's ``Downsample`` into stage ``s`` (the norm, a convolution of stride 2): its width out."""
        where = f"stages.{s}.downsample"
        if not self.is_timm(down, "Downsample"):
            raise self.unsupported(f"stage transition {type(down).__name__} at {where}")
        self.norm2d(down.norm, f"{where}.norm")
        k, stride, p = conv_geometry(self, down.conv, f"{where}.conv")
        if stride != 2 or p != (0 if k % 2 == 0 else k // 2) or down.conv.in_channels != in_dim:
            raise self.unsupported(f"downsampling convolution {k}x{k}, stride {stride}, padding {p} at {where}.conv")
        return down.conv.out_channels, {"name": "norm_conv", "params": {"kernel_size": k}}

    def head(self) -> dict[str, Any]:
        """timm's ``NormMlpClassifierHead``: an average pool, the norm, no hidden layer, dropout, a classifier."""
        from timm.layers import NormMlpClassifierHead

        h = self.m.head
        if not self.is_id(self.m.norm_pre) or type(h) is not NormMlpClassifierHead:
            raise self.unsupported("head other than pool, norm, classifier (head_norm_first)")
        if h.global_pool.pool_type != "avg" or not self.is_id(h.pre_logits):
            raise self.unsupported(f"head pool '{h.global_pool.pool_type}' or hidden layer (DaViT: avg, none)")
        self.norm2d(h.norm, "head.norm")
        num_classes = 0 if self.is_id(h.fc) else self.linear(h.fc, "head.fc").out_features
        if num_classes and h.fc.bias is None:
            raise self.unsupported("classifier head without bias")
        return {"pool": {"name": "adaptive_avg", "params": {"norm": True}}, "num_classes": num_classes,
                "drop_rate": fmt_float(h.drop.p)}

    def spec(self) -> ViTSpec:
        m = self.own_model()
        stem = m.stem
        if not self.is_timm(stem, "Stem") or conv_geometry(self, stem.conv, "stem.conv") != (7, 4, 3):
            raise self.unsupported("stem other than a 7x7 convolution of stride 4, padding 3")
        size = tuple((getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:])
        data: dict[str, Any] = {
            "name": self.name, "img_size": int(size[0]) if size[0] == size[1] else [int(v) for v in size],
            "patch_size": 7, "in_chans": stem.conv.in_channels, "dynamic_img_size": True,
            "patch_embed": {"name": "overlap",
                            "params": {"stride": 4, "eps": self.norm2d(stem.norm, "stem.norm", own=True)}},
            "class_token": False, "reg_tokens": 0, "pos_embed": {"name": "none"}, "pre_norm": False,
            "final_norm": False, "transition": {"name": "norm_conv"}, **self.head(),
        }
        width, stages, blocks = stem.conv.out_channels, [], []
        for s, st in enumerate(m.stages):
            if not self.is_timm(st, "DaVitStage") or not len(st.blocks):
                raise self.unsupported(f"stage {type(st).__name__} without blocks at stages.{s}")
            stage: dict[str, Any] = {}
            if s:
                width, stage["transition"] = self.downsample(st.downsample, s, width)
            elif not self.is_id(st.downsample):
                raise self.unsupported("downsampling before the first stage")
            read = []
            for j, pair in enumerate(st.blocks):
                kinds = [type(b).__name__ for b in pair]
                if type(pair) is not nn.Sequential or kinds != ["SpatialBlock", "ChannelBlock"]:
                    raise self.unsupported(f"attention types {kinds} at stages.{s}.blocks.{j} "
                                           "(DaViT: spatial, channel)")
                for k, b in enumerate(pair):
                    where = f"stages.{s}.blocks.{j}.{k}"
                    read.append((self.block(b, len(blocks) + len(read), width, where), width, where))
            blocks += read
            stages.append({"depth": len(read), "embed_dim": width, "num_heads": read[0][0].attn["heads"], **stage})
        first = self.alike(blocks[::2], "width or heads")
        self.alike(blocks[1::2], "width or heads")
        data["attention"], layers = self.per_block("attention", [{"name": b.attn["name"], "params": b.attn["params"]}
                                                                 for b, _, _ in blocks])
        data["mlp_ratio"], ratio_layers = self.per_block("mlp_ratio", self.mlp_ratios(blocks))
        if len(stages) > 1:  # the recipe's transition is the first stage's (each stage names its own too)
            data["transition"] = stages[1]["transition"]
        data.update(stages=stages, layers=layers + ratio_layers, block=first.block,
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]})
        return self.finish_staged(data, blocks)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return (spec.stages is not None and spec.patch_embed.name == "overlap"
            and all(p.transition.name == "norm_conv" for p in spec.stage_plans()[1:]))


def davit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``DaVit`` for a staged spec."""
    fail = refuser(spec, "DaVit")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or spec.final_norm:
        raise fail("prefix tokens, pre_norm or a final norm (DaViT: none, none, the head's norm after pooling)")
    pe = spec.patch_embed.params
    if (spec.patch_hw != (7, 7) or pe.get("stride") != 4 or pe.get("padding") not in (None, 3)
            or not pe.get("bias", True)):
        raise fail(f"patch embedding {spec.patch_embed.name} {pe} with patch_size {spec.patch_size} "
                   "(DaViT: overlap 7x7, stride 4, padding 3)")
    n = spec.norm
    if n.name != "layernorm" or not n.params.get("bias", True) or pe.get("eps", 1e-5) != n.params.get("eps"):
        raise fail(f"norm {n.name} {n.params} (DaViT: one LayerNorm with bias, the stem's eps too)")
    pool = spec.selection("pool")
    if pool.name != "adaptive_avg" or not pool.params.get("norm") or spec.selection("pos_embed").name != "none":
        raise fail(f"pool '{pool.name}' {pool.params} or a position embedding (DaViT: adaptive_avg with norm, none)")
    kernels = {p.transition.params.get("kernel_size", 2) for p in spec.stage_plans()[1:]}
    if len(kernels) > 1:
        raise fail(f"downsampling kernels {sorted(kernels)} that differ between stages")
    plans = spec.block_plans()
    for stage in spec.stage_plans():
        for j, i in enumerate(stage.blocks):
            p = plans[i]
            a, b, mlp = p.selections["attention"], p.selections["block"], p.selections["mlp"]
            want = "channel" if j % 2 else "window"
            if (a.name != want or b.name != "prenorm_cpe" or b.params.get("init_values") is not None
                    or b.params.get("attn_only_layer_scale") or mlp.name != "mlp" or mlp.params.get("norm")
                    or mlp.params.get("act", "gelu") != "gelu" or not mlp.params.get("bias", True)
                    or p.selections["norm"] != spec.norm):
                raise fail(f"block {i}: attention '{a.name}', block '{b.name}' {b.params}, MLP '{mlp.name}' "
                           f"{mlp.params} (DaViT: {want}, prenorm_cpe without layer scale, mlp with GELU)")
        if stage.depth % 2:
            raise fail(f"{stage.depth} blocks in stage {stage.index} (DaViT: spatial, channel pairs)")
    attn = [p.selections["attention"].params for p in plans]
    a0 = attn[0]
    windows = {repr([a["window_size"], a.get("shift", 0), a.get("rel_pos", "none"), a.get("cosine", False)])
               for a in attn[::2]}
    if (len(windows) != 1 or a0.get("shift", 0) or a0.get("rel_pos", "none") != "none" or a0.get("cosine")
            or len({repr([a.get(k) for k in ("qkv_bias", "proj_bias", "qk_norm", "kv_heads")]) for a in attn}) != 1):
        raise fail("window sizes that differ, a shift, a position bias or cosine windows, or attention biases, "
                   "qk_norm or kv_heads that differ between blocks (DaViT: one window, none, one set)")
    if (not a0.get("proj_bias", True) or a0.get("qk_norm") or a0.get("kv_heads") is not None or a0.get("attn_drop", 0.0)
            or a0.get("qkv_bias", True) == "qv" or spec.proj_drop_rate):
        raise fail("attention without output bias, with qk_norm, kv_heads, qv biases or dropout (DaViT: none)")
    v2 = {p.selections["attention"].params.get("v2", False) for p in plans[1::2]}
    cpe = {(p.selections["block"].params.get("cpe_kernel", 3), p.selections["block"].params.get("cpe_act", False))
           for p in plans}
    ratios = {p.mlp_ratio for p in plans}
    if len(v2) != 1 or len(cpe) != 1 or next(iter(cpe))[0] != 3 or len(ratios) != 1:
        raise fail("channel attention versions, position encodings (DaViT: 3x3) or MLP ratios that differ")
    return dict(
        in_chans=spec.in_chans, num_classes=spec.num_classes, global_pool="avg",
        depths=tuple(st.depth // 2 for st in spec.stages), embed_dims=tuple(st.embed_dim for st in spec.stages),
        num_heads=tuple(st.num_heads for st in spec.stages),
        window_size=a0["window_size"], mlp_ratio=ratios.pop(), qkv_bias=a0.get("qkv_bias", True),
        norm_eps=n.params["eps"], cpe_act=cpe.pop()[1], down_kernel_size=kernels.pop() if kernels else 2,
        channel_attn_v2=v2.pop(), drop_rate=spec.drop_rate, drop_path_rate=spec.drop_path_rate,
    )


FAMILY = TimmFamily(
    "davit", classes=("timm.models.davit.DaVit",), reader=DavitReader, claims=_claims,
    timm_class="timm.models.davit.DaVit", kwargs=davit_kwargs, state_dict=staged_state_dict(DAVIT, davit_kwargs),
    unkept=("img_size",), tables=(DAVIT,),
)
