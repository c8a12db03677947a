"""timm's ``Twins`` (Chu et al. 2021; ``twins``: PCPVT and SVT) <-> a staged vitlab spec.

Twins is a vitlab model with ``stages``: an ``overlap`` patch embedding that does not overlap (a
4x4 convolution of stride 4, then a LayerNorm of its own), ``conv_embed`` transitions into every
later stage (a 2x2 convolution of stride 2 and a LayerNorm), no position embedding and no prefix
tokens. PCPVT's blocks all attend with ``sra`` (global sub-sampled attention, PVT's spatial
reduction); SVT's alternate ``window`` (locally-grouped attention: ``rel_pos: none``) on even blocks
of a stage with ``sra`` on odd ones. The first block of each stage is a ``prenorm_peg`` (CPVT's
position generator after it, timm's ``pos_block``), the others ``prenorm``; a final norm and an
average pool feed the classifier.

The state-dict differences are the ``TWINS`` table: per-stage embeddings (``patch_embeds.{stage}``:
the first vitlab's ``patch_embed``, the others its transitions), blocks per stage
(``blocks.{stage}.{j}``), and each stage's generator (``pos_block.{stage}.proj.0``), which is
``blocks.{first block of the stage}.peg.proj`` (a block index the templates cannot say).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Container, Sequence

from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import norm_layer, pair, refuser
from ..family import Exporting, TimmFamily
from ..reader import fmt_float
from ..staged import stage_values, staged_state_dict
from .pvt_v2 import SraReader, read_sra


@dataclass(frozen=True)
class PosBlockFamily(Family):
    """A table whose ``pos_block.{stage}.proj.0`` is vitlab's ``blocks.{stage's first block}.peg.proj``."""

    def to_vitlab(self, key: str, depths: Sequence[int] | None = None) -> str:
        m = re.match(r"pos_block\.(\d+)\.proj\.0\.(.+)$", key)
        if m is not None and depths is not None and int(m[1]) < len(depths):
            return f"blocks.{sum(depths[:int(m[1])])}.peg.proj.{m[2]}"
        return super().to_vitlab(key, depths)

    def to_timm(self, key: str, into: Container[str] | None = None, depths: Sequence[int] | None = None) -> str:
        m = re.match(r"blocks\.(\d+)\.peg\.proj\.(.+)$", key)
        if m is not None and depths is not None:
            starts = [sum(depths[:s]) for s in range(len(depths))]
            if int(m[1]) in starts:
                return f"pos_block.{starts.index(int(m[1]))}.proj.0.{m[2]}"
        return super().to_timm(key, into, depths)


TWINS = PosBlockFamily(
    "twins", marker=r"pos_block\.\d+\.proj\.0\.",
    renames=(("patch_embeds.0.{rest}", "patch_embed.{rest}"),
             ("patch_embeds.{stage}.{rest}", "transitions.{stage}.{rest}"),
             ("blocks.{stage}.{j}.{rest}", "blocks.{block}.{rest}")),
)


# --- timm -> spec ------------------------------------------------------------------------------------

class TwinsReader(SraReader):
    """Reads a timm ``Twins`` instance (its modules and shapes, never its name)."""

    timm_module, model_cls = "timm.models.twins", "Twins"
    embed_cls, block_name = "PatchEmbed", "prenorm"

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        if self.is_timm(a, "GlobalSubSampleAttn"):
            return read_sra(self, a, where, dim)
        if not self.is_timm(a, "LocallyGroupedAttn"):
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if qkv.out_features != 3 * dim or proj.out_features != dim:
            raise self.unsupported(f"attention width other than the stage's {dim} at {where}")
        return {"name": "window", "heads": a.num_heads, "proj_drop": a.proj_drop.p,
                "params": {"window_size": a.ws, "rel_pos": "none", "qkv_bias": qkv.bias is not None,
                           "proj_bias": proj.bias is not None, "attn_drop": fmt_float(a.attn_drop.p)}}

    def pos_conv(self, pc: nn.Module, dim: int, where: str) -> None:
        conv = pc.proj[0] if self.is_timm(pc, "PosConv") and len(pc.proj) == 1 else None
        if (conv is None or pc.stride != 1 or type(conv) is not nn.Conv2d or conv.groups != dim or conv.bias is None
                or tuple(conv.kernel_size) != (3, 3) or tuple(conv.padding) != (1, 1) or conv.out_channels != dim):
            raise self.unsupported(f"position generator other than a 3x3 depthwise conv with bias at {where}")

    def spec(self) -> ViTSpec:
        m = self.own_model()
        if m.global_pool != "avg":
            raise self.unsupported(f"global_pool '{m.global_pool}'")
        if any(d.p for d in m.pos_drops):
            raise self.unsupported("dropout after every stage's patch embedding (pos_drop_rate)")
        width, pe = self.embed(m.patch_embeds[0], "patch_embeds.0")
        if pe["k"] != pe["stride"] or pe["padding"]:
            raise self.unsupported("overlapping first patch embedding")
        h, w = m.patch_embeds[0].img_size
        data: dict[str, Any] = {
            "name": self.name, "img_size": int(h) if h == w else [int(h), int(w)], "patch_size": pe["k"],
            "in_chans": m.patch_embeds[0].proj.in_channels, "class_token": False, "reg_tokens": 0,
            "patch_embed": {"name": "overlap", "params": {"padding": 0, "eps": pe["eps"]}},
            "pos_embed": {"name": "none"}, "pool": {"name": "avg"}, "pre_norm": False, "final_norm": True,
            "transition": {"name": "conv_embed"},
        }
        stages, blocks = [], []
        for s, (embed, stage_blocks) in enumerate(zip(m.patch_embeds, m.blocks)):
            stage: dict[str, Any] = {}
            if s:
                width, t = self.embed(embed, f"patch_embeds.{s}")
                stage["transition"] = {"name": "conv_embed", "params": {
                    "kernel_size": t["k"], "stride": t["stride"], "padding": t["padding"], "eps": t["eps"]}}
            self.pos_conv(m.pos_block[s], width, f"pos_block.{s}")
            stages.append({**self.stage(s, stage_blocks, width, f"blocks.{s}", blocks), **stage})
        first = self.alike(blocks, "attention, heads or width", attn=("heads", "params", "name"))
        attn = [{"name": b.attn["name"], "params": b.attn["params"]} for b, _, _ in blocks]
        data["attention"], layers = self.per_block("attention", attn)
        # the first block of every stage carries the stage's position generator
        kinds = [{"name": "prenorm" if j else "prenorm_peg"} for st in stages for j in range(st["depth"])]
        data["block"], block_layers = self.per_block("block", kinds)
        data["mlp_ratio"], ratio_layers = self.per_block("mlp_ratio", self.mlp_ratios(blocks))
        self.norm(m.norm, "norm")
        data.update(stages=stages, layers=layers + block_layers + ratio_layers,
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]}, **self.linear_head())
        return self.finish_staged(data, blocks)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return spec.stages is not None and any(p.selections["block"].name == "prenorm_peg" for p in spec.block_plans())


def twins_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Twins`` for a staged spec."""
    fail = refuser(spec, "Twins")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or not spec.final_norm or spec.dynamic_img_size:
        raise fail("prefix tokens, pre_norm, dynamic_img_size or no final norm (Twins: none, none, no, a final norm)")
    pe, k = spec.patch_embed.params, spec.patch_hw[0]
    if (spec.patch_embed.name != "overlap" or pe.get("stride") not in (None, k) or pe.get("padding") != 0
            or not pe.get("bias", True) or pe.get("eps") != 1e-5 or spec.patch_hw[1] != k):
        raise fail(f"patch embedding {spec.patch_embed.name} {pe} (Twins: overlap, stride = patch, padding 0)")
    for stage in spec.stage_plans()[1:]:
        t = stage.transition
        if t.name != "conv_embed" or (t.params.get("kernel_size"), t.params.get("stride"), t.params.get("padding"),
                                      t.params.get("in_norm", False), t.params.get("eps", 1e-5)) != (2, 2, 0, False, 1e-5):
            raise fail(f"transition {t.name} {t.params} into stage {stage.index} (Twins: conv_embed 2x2, stride 2, padding 0)")
    if spec.pos_embed.name != "none" or spec.pool.name != "avg" or spec.pool.params.get("norm"):
        raise fail("a position embedding, or a pool other than avg (Twins: none, avg)")
    plans, wss, srs = spec.block_plans(), [], []
    for stage in spec.stage_plans():
        mine = [plans[i] for i in stage.blocks]
        for j, p in enumerate(mine):
            b, m = p.selections["block"], p.selections["mlp"]
            if b.name != ("prenorm_peg" if j == 0 else "prenorm") or any(v not in (None, False, 3) for v in b.params.values()):
                raise fail(f"block {p.index} '{b.name}' {b.params} (Twins: prenorm_peg first in a stage, prenorm after)")
            if m.name != "mlp" or m.params.get("act", "gelu") != "gelu" or not m.params.get("bias", True) or m.params.get("norm"):
                raise fail(f"mlp '{m.name}' {m.params} at block {p.index} (Twins: mlp with GELU)")
        sels = [p.selections["attention"] for p in mine]
        local = [s.params["window_size"] for s in sels[::2] if s.name == "window"]
        if local and (len(local) != len(sels[::2]) or len(set(local)) != 1):
            raise fail(f"attention in stage {stage.index} other than window on even blocks, sra on odd (Twins-SVT)")
        glob = [s for s in (sels[1::2] if local else sels) if s.name == "sra"]
        if len(glob) != len(sels[1::2] if local else sels) or len({s.params["sr_ratio"] for s in glob}) > 1:
            raise fail(f"attention in stage {stage.index} other than sra of one sr_ratio (Twins)")
        wss.append(local[0] if local else None)
        srs.append(glob[0].params["sr_ratio"] if glob else 1)
    for p in plans:
        a = p.selections["attention"].params
        if (a.get("rel_pos", "none") != "none" or a.get("shift", 0) or a.get("linear") or not a.get("qkv_bias", True)
                or not a.get("proj_bias", True) or a.get("eps", 1e-5) != 1e-5 or a.get("qk_norm") or a.get("kv_heads")):
            raise fail(f"attention {a} at block {p.index} (Twins: biases, no shift, no table, eps 1e-5)")
    if len({w is None for w in wss}) != 1:
        raise fail("windows in some stages only")
    return dict(
        img_size=pair(spec.img_size), patch_size=k, in_chans=spec.in_chans, num_classes=spec.num_classes,
        global_pool="avg", embed_dims=tuple(st.embed_dim for st in spec.stages),
        num_heads=tuple(st.num_heads for st in spec.stages),
        mlp_ratios=tuple(stage_values(spec, fail, "MLP ratio", lambda p: p.mlp_ratio)),
        depths=tuple(st.depth for st in spec.stages), sr_ratios=tuple(srs), wss=None if wss[0] is None else tuple(wss),
        drop_rate=spec.drop_rate, proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=plans[0].selections["attention"].params.get("attn_drop", 0.0),
        drop_path_rate=spec.drop_path_rate, norm_layer=norm_layer(spec, fail),
    )


FAMILY = TimmFamily(
    "twins", classes=("timm.models.twins.Twins",), reader=TwinsReader, claims=_claims,
    timm_class="timm.models.twins.Twins", kwargs=twins_kwargs, state_dict=staged_state_dict(TWINS, twins_kwargs),
    tables=(TWINS,),
)
