"""timm's ``PyramidVisionTransformerV2`` (PVTv2, Wang et al. 2022; ``pvt_v2``) <-> a staged vitlab spec.

PVTv2 is a vitlab model with ``stages``: an ``overlap`` patch embedding (a 7x7 convolution of
stride 4, padding 3, then a LayerNorm of its own), no position embedding and no prefix tokens,
``conv_embed`` transitions into every stage after the first (the norm that ends the previous
stage, a 3x3 convolution of stride 2, a LayerNorm), and ``prenorm_grid`` blocks of ``sra``
attention (keys and values from the grid reduced by ``sr_ratio``, or pooled to 7x7 in the
``linear`` models) and ``conv_mlp`` (a depthwise 3x3 convolution inside the MLP). The norm that
ends the last stage is the final norm; an average pool feeds the classifier. Widths, heads, SR
and MLP ratios vary per stage (``stages`` and ``layers``). timm takes any image size: the spec is
``dynamic_img_size`` at the model's default input size.

The state-dict differences are the ``PVT`` table: blocks and downsampling per stage
(``stages.{stage}.blocks.{j}``, ``stages.{stage}.downsample``), and each stage's closing norm
(``stages.{stage}.norm``), which is vitlab's next transition's ``in_norm`` or, for the last
stage, the final ``norm``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Container, Sequence

from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import norm_layer, refuser
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, Reader, fmt_float
from ..staged import StagedReader, conv_geometry, drop_path_of, own_norm, stage_values, staged_state_dict


@dataclass(frozen=True)
class StageNormFamily(Family):
    """A table whose ``stages.{stage}.norm`` closes each stage: vitlab's ``transitions.{stage + 1}.in_norm``,
    the last stage's vitlab's final ``norm`` (an index shift the templates cannot say)."""

    def to_vitlab(self, key: str, depths: Sequence[int] | None = None) -> str:
        m = re.match(r"stages\.(\d+)\.norm\.(.+)$", key)
        if m is not None and depths is not None and int(m[1]) < len(depths):
            s = int(m[1])
            return f"norm.{m[2]}" if s == len(depths) - 1 else f"transitions.{s + 1}.in_norm.{m[2]}"
        return super().to_vitlab(key, depths)

    def to_timm(self, key: str, into: Container[str] | None = None, depths: Sequence[int] | None = None) -> str:
        if (m := re.match(r"transitions\.(\d+)\.in_norm\.(.+)$", key)) is not None:
            return f"stages.{int(m[1]) - 1}.norm.{m[2]}"
        if key.startswith("norm.") and depths is not None:
            return f"stages.{len(depths) - 1}.{key}"
        return super().to_timm(key, into, depths)


PVT = StageNormFamily(
    "pvt_v2", marker=r"stages\.\d+\.blocks\.\d+\.mlp\.dwconv\.",
    renames=(("stages.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
             ("stages.{stage}.downsample.{rest}", "transitions.{stage}.{rest}")),
)


def read_sra(reader: Reader, a: nn.Module, where: str, dim: int) -> dict:
    """PVTv2's ``Attention`` or Twins' ``GlobalSubSampleAttn`` (q, kv, optional sr + norm, proj) as ``sra``."""
    q, kv, proj = (reader.linear(getattr(a, n), f"{where}.{n}") for n in ("q", "kv", "proj"))
    if q.out_features != dim or kv.out_features != 2 * dim or proj.out_features != dim or a.num_heads * (dim // a.num_heads) != dim:
        raise reader.unsupported(f"attention width other than the stage's {dim} at {where}")
    if (q.bias is None) != (kv.bias is None):
        raise reader.unsupported(f"a bias on only one of q / kv at {where}")
    params: dict[str, Any] = {"qkv_bias": q.bias is not None, "proj_bias": proj.bias is not None,
                              "attn_drop": fmt_float(a.attn_drop.p), "sr_ratio": 1, "linear": False,
                              "pool_size": 7, "eps": 1e-5}  # all written: ``layers`` entries merge into the recipe's
    pool = getattr(a, "pool", None)
    if pool is not None:
        if type(pool) is not nn.AdaptiveAvgPool2d or not isinstance(pool.output_size, int):
            raise reader.unsupported(f"pooling {type(pool).__name__} at {where}.pool")
        if conv_geometry(reader, a.sr, f"{where}.sr") != (1, 1, 0) or type(a.act) is not nn.GELU or a.act.approximate != "none":
            raise reader.unsupported(f"linear spatial reduction other than a 1x1 conv, the norm and GELU at {where}")
        params.update(linear=True, pool_size=pool.output_size, eps=own_norm(reader, a.norm, f"{where}.norm"))
    elif a.sr is not None:
        k, s, p = conv_geometry(reader, a.sr, f"{where}.sr")
        if k != s or p:
            raise reader.unsupported(f"spatial reduction with kernel {k} != stride {s} or padding at {where}.sr")
        params.update(sr_ratio=k, eps=own_norm(reader, a.norm, f"{where}.norm"))
    return {"name": "sra", "params": params, "heads": a.num_heads, "proj_drop": a.proj_drop.p}


def pad(conv: dict) -> int | None:
    """A convolution's padding as the components write it: ``None`` for their default, kernel // 2."""
    return None if conv["padding"] == conv["k"] // 2 else conv["padding"]


# --- timm -> spec ------------------------------------------------------------------------------------

class SraReader(StagedReader):
    """What PVTv2's and Twins' readers share: blocks of ``block_cls`` (``norm1, attn, norm2, mlp``)
    read as ``block_name``, and convolutional patch embeddings of ``embed_cls`` with their own norm."""

    embed_cls, block_cls, block_name = "", "Block", ""

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        if not self.is_timm(b, self.block_cls):
            raise self.unsupported(f"block type {type(b).__module__}.{type(b).__name__} at {where}")
        attn, mlp = self.parts(b, where, dim=dim)
        return BlockRead(attn, mlp, {"name": self.block_name}, drop_path_of(b))

    def embed(self, pe: nn.Module, where: str) -> tuple[int, dict]:
        """A patch embedding (a conv, then its own LayerNorm): (its width, its geometry and norm eps)."""
        if not self.is_timm(pe, self.embed_cls):
            raise self.unsupported(f"patch embedding {type(pe).__name__} at {where}")
        k, s, p = conv_geometry(self, pe.proj, f"{where}.proj")
        return pe.proj.out_channels, {"k": k, "stride": s, "padding": p, "eps": own_norm(self, pe.norm, f"{where}.norm")}


class PvtReader(SraReader):
    """Reads a timm ``PyramidVisionTransformerV2`` instance (its modules and shapes, never its name)."""

    timm_module, model_cls = "timm.models.pvt_v2", "PyramidVisionTransformerV2"
    embed_cls, block_name = "OverlapPatchEmbed", "prenorm_grid"

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        if not self.is_timm(a, "Attention"):
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        return read_sra(self, a, where, dim)

    def mlp(self, mlp: nn.Module, where: str, dim: int | None = None) -> dict:
        if not self.is_timm(mlp, "MlpWithDepthwiseConv"):
            raise self.unsupported(f"MLP {type(mlp).__name__} at {where}")
        fc1, fc2 = self.linear(mlp.fc1, f"{where}.fc1"), self.linear(mlp.fc2, f"{where}.fc2")
        hidden, dw = fc1.out_features, mlp.dwconv
        if fc1.bias is None or fc2.bias is None or fc2.out_features != dim:
            raise self.unsupported(f"MLP without biases or of another width at {where}")
        if (type(dw) is not nn.Conv2d or dw.groups != hidden or dw.out_channels != hidden or dw.bias is None
                or dw.kernel_size[0] != dw.kernel_size[1] or tuple(dw.padding) != (dw.kernel_size[0] // 2,) * 2
                or tuple(dw.stride) != (1, 1)):
            raise self.unsupported(f"MLP convolution other than a same-size depthwise one at {where}.dwconv")
        relu = type(mlp.relu) is nn.ReLU
        if not relu and not self.is_id(mlp.relu):
            raise self.unsupported(f"{type(mlp.relu).__name__} before the MLP convolution at {where}")
        return {"name": "conv_mlp", "hidden": hidden, "drop": mlp.drop.p,
                "params": {"act": self.act(mlp.act, f"{where}.act"), "extra_relu": relu,
                           "kernel_size": dw.kernel_size[0]}}

    def spec(self) -> ViTSpec:
        m = self.own_model()
        if m.global_pool != "avg":
            raise self.unsupported(f"global_pool '{m.global_pool}' (feature maps out, no pooling)")
        width, pe = self.embed(m.patch_embed, "patch_embed")
        size = tuple((getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:])
        data: dict[str, Any] = {
            "name": self.name, "img_size": int(size[0]) if size[0] == size[1] else [int(v) for v in size],
            "patch_size": pe["k"], "in_chans": m.patch_embed.proj.in_channels, "dynamic_img_size": True,
            "patch_embed": {"name": "overlap", "params": {"stride": pe["stride"], "padding": pad(pe), "eps": pe["eps"]}},
            "class_token": False, "reg_tokens": 0, "pos_embed": {"name": "none"}, "pool": {"name": "avg"},
            "pre_norm": False, "final_norm": True, "transition": {"name": "conv_embed"},
        }
        stages, blocks = [], []
        for s, st in enumerate(m.stages):
            if not self.is_timm(st, "PyramidVisionTransformerStage"):
                raise self.unsupported(f"stage {type(st).__name__} at stages.{s}")
            stage: dict[str, Any] = {}
            if s:
                width, t = self.embed(st.downsample, f"stages.{s}.downsample")
                stage["transition"] = {"name": "conv_embed", "params": {
                    "kernel_size": t["k"], "stride": t["stride"], "padding": pad(t), "in_norm": True, "eps": t["eps"]}}
            elif st.downsample is not None:
                raise self.unsupported("downsampling before the first stage")
            self.norm(st.norm, f"stages.{s}.norm")
            stages.append({**self.stage(s, st.blocks, width, f"stages.{s}.blocks", blocks), **stage})
        first = self.alike(blocks, "SR ratio, heads or width")
        attn = [{"name": "sra", "params": b.attn["params"]} for b, _, _ in blocks]
        data["attention"], layers = self.per_block("attention", attn)
        data["mlp_ratio"], ratio_layers = self.per_block("mlp_ratio", self.mlp_ratios(blocks))
        if len(stages) > 1:  # the recipe's transition is the first stage's (each stage names its own too)
            data["transition"] = stages[1]["transition"]
        data.update(stages=stages, layers=layers + ratio_layers, block=first.block,
                    mlp={"name": "conv_mlp", "params": first.mlp["params"]}, **self.linear_head())
        return self.finish_staged(data, blocks)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return (spec.stages is not None and spec.patch_embed.name == "overlap"
            and all(p.transition.name == "conv_embed" and p.transition.params.get("in_norm")
                    for p in spec.stage_plans()[1:]))


def pvt_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``PyramidVisionTransformerV2`` for a staged spec."""
    fail = refuser(spec, "PyramidVisionTransformerV2")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or not spec.final_norm:
        raise fail("prefix tokens, pre_norm or no final norm (PVTv2: none, none, the last stage's norm)")
    pe = spec.patch_embed.params
    if (spec.patch_hw != (7, 7) or pe.get("stride") != 4 or pe.get("padding") not in (None, 3)
            or not pe.get("bias", True) or pe.get("eps", 1e-5) != 1e-5):
        raise fail(f"patch embedding {spec.patch_embed.name} {pe} with patch_size {spec.patch_size} "
                   "(PVTv2: overlap 7x7, stride 4, padding 3)")
    for stage in spec.stage_plans()[1:]:
        t = stage.transition.params
        if (t.get("kernel_size", 3), t.get("stride", 2), t.get("padding"), t.get("eps", 1e-5)) not in ((3, 2, None, 1e-5), (3, 2, 1, 1e-5)):
            raise fail(f"transition {t} into stage {stage.index} (PVTv2: conv_embed 3x3, stride 2, in_norm)")
    for kind, name in (("pos_embed", "none"), ("pool", "avg"), ("block", "prenorm_grid"), ("mlp", "conv_mlp"),
                       ("attention", "sra")):
        for p in spec.block_plans() if kind in ("block", "mlp", "attention") else [None]:
            sel = p.selections[kind] if p else spec.selection(kind)
            if sel.name != name or (kind == "block" and sel.params.get("init_values") is not None) or (
                    kind == "pool" and sel.params.get("norm")):
                raise fail(f"{kind} '{sel.name}' {sel.params} (PVTv2: {name})")
    attn = stage_values(spec, fail, "attention", lambda p: p.selections["attention"].params)
    linear = {a.get("linear", False) for a in attn}
    common = {repr({k: v for k, v in a.items() if k != "sr_ratio"}) for a in attn}
    mlps = {repr(p.selections["mlp"].params) for p in spec.block_plans()}
    if len(common) != 1 or len(mlps) != 1:
        raise fail("attention or MLP params other than sr_ratio that differ between blocks")
    a, m = attn[0], spec.block_plans()[0].selections["mlp"].params
    if (a.get("pool_size", 7) != 7 or a.get("eps", 1e-5) != 1e-5 or not a.get("proj_bias", True)
            or m.get("act", "gelu") != "gelu" or not m.get("bias", True) or m.get("norm") or m.get("kernel_size", 3) != 3
            or m.get("out_bias") is False or m.get("extra_relu", False) != a.get("linear", False)):
        raise fail(f"attention {a} or MLP {m} (PVTv2: pool 7, eps 1e-5, biases, GELU, 3x3, a ReLU iff linear)")
    return dict(
        in_chans=spec.in_chans, num_classes=spec.num_classes, global_pool="avg",
        depths=tuple(st.depth for st in spec.stages), embed_dims=tuple(st.embed_dim for st in spec.stages),
        num_heads=tuple(st.num_heads for st in spec.stages),
        sr_ratios=tuple(1 if x.get("linear") else x.get("sr_ratio", 1) for x in attn),
        mlp_ratios=tuple(stage_values(spec, fail, "MLP ratio", lambda p: p.mlp_ratio)),
        qkv_bias=a.get("qkv_bias", True), linear=linear.pop(), drop_rate=spec.drop_rate,
        proj_drop_rate=spec.proj_drop_rate, attn_drop_rate=a.get("attn_drop", 0.0),
        drop_path_rate=spec.drop_path_rate, norm_layer=norm_layer(spec, fail),
    )


FAMILY = TimmFamily(
    "pvt_v2", classes=("timm.models.pvt_v2.PyramidVisionTransformerV2",), reader=PvtReader,
    claims=_claims, timm_class="timm.models.pvt_v2.PyramidVisionTransformerV2", kwargs=pvt_kwargs,
    state_dict=staged_state_dict(PVT, pvt_kwargs), unkept=("img_size",), tables=(PVT,),
)
