"""timm's ``MultiScaleVit`` (MViTv2, Li et al. 2022; ``mvitv2``) <-> a staged vitlab spec.

MViTv2 is a vitlab model with ``stages``: a ``conv_padded`` patch embedding (7x7, stride 4,
padding 3), an optional class token, no position embedding, blocks of ``pooling`` attention
(queries pooled with stride 1, keys and values with the stage's ``stride_kv``, written as
``layers``), and a ``pooling_block`` transition into every stage after the first: timm's first
block of that stage, which widens the tokens and pools the queries. A timm stage of depth d is
therefore a vitlab stage of depth d - 1 after the first. The final norm and an average (or class
token) pool feed the classifier.

With ``expand_attn=False`` (``mvitv2_large``) the last block of a stage widens the tokens in its
MLP, at that stage's grid and heads: the next transition holds it (``pooling_block`` with
``widen: mlp``, ``in_heads``, ``in_attention``), so that stage is one block shorter still, and the
pooling block keeps the width.

The state-dict differences are the ``MVIT`` table: timm numbers blocks per stage
(``stages.{stage}.blocks.{j}``), its block 0 of a later stage is vitlab's
``transitions.{stage}``, a widening last block the next transition's ``widen``, and the
classifier is ``head.fc``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import refuser, require
from ..family import Exporting, TimmFamily
from ..reader import Reader, common_and_layers, fmt_float

_TIMM_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)$")
_TRANSITION = re.compile(r"transitions\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class MvitTable(Family):
    """``Family`` whose timm block j of stage s > 0 is vitlab's block j - 1 of that stage, block 0
    the transition into it, and a block past vitlab's stage (a widening last block) the next
    transition's ``widen`` (a shift the ``{j}`` templates cannot say); ``depths``: vitlab's."""

    def to_vitlab(self, key: str, depths: Sequence[int] | None = None) -> str:
        m = _TIMM_BLOCK.match(key)
        if m is None or depths is None:
            return super().to_vitlab(key, depths)
        s, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if s and not j:
            return f"transitions.{s}.{rest}"
        j -= bool(s)
        if s + 1 < len(depths) and j == depths[s]:
            return f"transitions.{s + 1}.widen.{rest}"
        return key if s >= len(depths) or j >= depths[s] else f"blocks.{sum(depths[:s]) + j}.{rest}"

    def to_timm(self, key: str, into=None, depths: Sequence[int] | None = None) -> str:
        if depths is not None and (m := _TRANSITION.match(key)):
            s, rest = int(m.group(1)), m.group(2)
            if rest.startswith("widen."):  # the previous stage's last block
                return f"stages.{s - 1}.blocks.{depths[s - 1] + bool(s - 1)}.{rest[6:]}"
            return f"stages.{s}.blocks.0.{rest}"
        if depths is not None and (m := _BLOCK.match(key)):
            b, start = int(m.group(1)), 0
            for s, d in enumerate(depths):
                if b < start + d:
                    return f"stages.{s}.blocks.{b - start + bool(s)}.{m.group(2)}"
                start += d
        return super().to_timm(key, into, depths)


MVIT = MvitTable(
    "mvitv2",
    marker=r"stages\.\d+\.blocks\.\d+\.(shortcut_proj_(attn|mlp)\.|attn\.(rel_pos_h$|pool_[qk]\.|norm_q\.))",
    renames=(("head.fc.{rest}", "head.{rest}"),),
)

# what every MViTv2 block is apart from its attention's strides: kind -> (component, params)
_FIXED: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {"act": "gelu"}),
    "block": ("prenorm", {}),
    "pos_embed": ("none", {}),
}


# --- timm -> spec ------------------------------------------------------------------------------------

class MvitReader(Reader):
    """Reads a timm ``MultiScaleVit`` instance (its modules and shapes, never its name)."""

    def attention(self, a: nn.Module, where: str, dim: int | None = None, dim_in: int | None = None) -> dict:
        """A ``MultiScaleAttention`` as ``pooling`` params plus its query stride (``stride_q``)."""
        from timm.models.mvitv2 import MultiScaleAttention

        if type(a) is not MultiScaleAttention:  # MultiScaleAttentionPoolFirst pools before the projections
            raise self.unsupported(f"attention layer {type(a).__name__} (pool_first) at {where}")
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if qkv.in_features != dim_in or qkv.out_features != 3 * dim or proj.bias is None or a.dim_out != dim:
            raise self.unsupported(f"attention widths or an output projection without bias at {where}")
        kernels, strides, modes = set(), {}, set()
        for n in "qkv":
            pool, norm = getattr(a, f"pool_{n}"), getattr(a, f"norm_{n}")
            strides[n] = 1
            if pool is None:
                continue
            if isinstance(pool, nn.Conv2d):
                hd = dim // a.num_heads
                if pool.groups != hd or pool.in_channels != hd or pool.bias is not None:
                    raise self.unsupported(f"pooling convolution other than depthwise per head (conv_unshared) "
                                           f"at {where}.pool_{n}")
                modes.add("conv")
                self.norm(norm, f"{where}.norm_{n}")
            elif type(pool) in (nn.MaxPool2d, nn.AvgPool2d):
                modes.add("max" if type(pool) is nn.MaxPool2d else "avg")
            else:
                raise self.unsupported(f"pooling layer {type(pool).__name__} at {where}.pool_{n}")
            k, s, p = (tuple(v) if isinstance(v, (tuple, list)) else (v, v)
                       for v in (pool.kernel_size, pool.stride, pool.padding))
            if k[0] != k[1] or s[0] != s[1] or p != (k[0] // 2,) * 2:
                raise self.unsupported(f"non-square pooling at {where}.pool_{n}")
            kernels.add(k[0])
            strides[n] = s[0]
        if len(kernels) > 1 or len(modes) > 1 or strides["k"] != strides["v"]:
            raise self.unsupported(f"q, k and v pooled with different kernels, modes or strides at {where}")
        params = {"qkv_bias": qkv.bias is not None, "kernel": kernels.pop() if kernels else 1,
                  "stride_kv": strides["k"], "mode": modes.pop() if modes else "conv",
                  "residual_pooling": bool(a.residual_pooling), "rel_pos": a.rel_pos_type == "spatial"}
        return {"heads": a.num_heads, "params": params, "stride_q": strides["q"]}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> tuple[dict, dict, float]:
        """A ``MultiScaleBlock`` whose attention is ``dim`` wide: (attention read, MLP read,
        stochastic-depth rate). Its MLP may end wider (``b.dim_out``, expand_attn=False), the
        residual then projected by ``shortcut_proj_mlp``."""
        from timm.models.mvitv2 import MultiScaleBlock

        if type(b) is not MultiScaleBlock:
            raise self.unsupported(f"block type {type(b).__name__} at {where}")
        if (b.shortcut_proj_mlp is None) != (b.dim_out == dim) or (b.dim_out != dim and b.dim != dim):
            raise self.unsupported(f"MLP widths other than timm's expand_attn layouts at {where}")
        if b.shortcut_proj_mlp is not None:
            self.linear(b.shortcut_proj_mlp, f"{where}.shortcut_proj_mlp")
        if b.shortcut_proj_attn is not None:
            self.linear(b.shortcut_proj_attn, f"{where}.shortcut_proj_attn")
        self.norm(b.norm1, f"{where}.norm1")
        self.norm(b.norm2, f"{where}.norm2")
        attn = self.attention(b.attn, f"{where}.attn", dim, b.dim)
        sq = attn["stride_q"]
        pool = b.shortcut_pool_attn
        if (pool is None) != (sq == 1) or (pool is not None and (tuple(pool.kernel_size), tuple(pool.stride)) != (
                (sq + 1,) * 2, (sq,) * 2)):
            raise self.unsupported(f"residual pooling other than a max pool of the query stride at {where}")
        mlp = self.mlp(b.mlp, f"{where}.mlp", b.dim_out)
        return attn, mlp, float(getattr(b.drop_path1, "drop_prob", 0.0))

    def spec(self) -> ViTSpec:
        from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitStage, PatchEmbed

        m = self.m
        if type(m) is not MultiScaleVit:
            raise self.unsupported(f"MultiScaleVit subclass {type(m).__name__}")
        if m.pos_embed is not None:
            raise self.unsupported("absolute position embedding (use_abs_pos)")
        if type(m.patch_embed) is not PatchEmbed or type(m.patch_embed.proj) is not nn.Conv2d:
            raise self.unsupported(f"patch embedding {type(m.patch_embed).__name__}")
        conv = m.patch_embed.proj
        k, s, p = (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding))
        if len({*k}) != 1 or len({*s}) != 1 or len({*p}) != 1 or conv.groups != 1 or tuple(conv.dilation) != (1, 1):
            raise self.unsupported("patch embedding with non-square kernel, stride or padding")
        grid = tuple(m.stages[0].feat_size)  # timm keeps no img_size: the stride times the first grid
        data: dict[str, Any] = {
            "name": self.name, "img_size": [grid[0] * s[0], grid[1] * s[0]] if grid[0] != grid[1] else grid[0] * s[0],
            "patch_size": k[0], "in_chans": conv.in_channels, "pre_norm": False, "reg_tokens": 0,
            "patch_embed": {"name": "conv_padded", "params": {"stride": s[0], "padding": p[0], "bias": conv.bias is not None}},
            "class_token": m.cls_token is not None, "pos_embed": {"name": "none"},
            "transition": {"name": "pooling_block"},
        }
        width, stages, reads, where_of, drops, held = conv.out_channels, [], [], [], [], None
        for si, stage in enumerate(m.stages):
            if type(stage) is not MultiScaleVitStage:
                raise self.unsupported(f"stage {si} of type {type(stage).__name__}")
            entry: dict[str, Any] = {}
            for j, b in enumerate(stage.blocks):
                where = f"stages.{si}.blocks.{j}"
                dim_in, att, width = width, b.attn.dim_out, b.dim_out
                attn, mlp, drop = self.block(b, 0, att, where)
                if width != att and (j != len(stage.blocks) - 1 or si == len(m.stages) - 1 or (si and not j)
                                     or attn["stride_q"] != 1):
                    raise self.unsupported(f"a width changed by the MLP other than in the last block of a stage "
                                           f"before the last, after its first (vitlab's transition) at {where}")
                if si and not j:
                    params = {"stride_q": attn["stride_q"], "attention": attn["params"]}
                    if held is not None:  # the previous stage's widening last block
                        if int(width * data["mlp_ratio"]) * held["dim"] // width != held["hidden"]:
                            raise self.unsupported(f"widening MLP of hidden width {held['hidden']} (vitlab's: the "
                                                   f"stage's scaled to the previous width) before {where}")
                        params.update(widen="mlp", in_heads=held["heads"], in_attention=held["params"])
                    entry["transition"] = {"name": "pooling_block", "params": params}
                    held = None
                elif width != att:
                    held = {**attn, "hidden": mlp["hidden"], "dim": att}
                elif attn["stride_q"] != 1 or dim_in != width:
                    raise self.unsupported(f"pooled queries or a new width inside a stage at {where}")
                else:
                    reads.append(attn)
                    where_of.append(where)
                    drops.append(drop)
                if entry.setdefault("num_heads", attn["heads"]) != attn["heads"]:
                    raise self.unsupported(f"heads that differ within stage {si} at {where}")
                hidden = mlp["hidden"]
                ratio = self.mlp_ratio(hidden, f"{where}.mlp", att)
                data.setdefault("mlp_ratio", ratio)
                if int(att * data["mlp_ratio"]) != hidden or mlp["params"] != {"bias": True, "norm": False, "act": "gelu"}:
                    raise self.unsupported(f"MLP other than the model's (ratio {data['mlp_ratio']:g}, GELU) at {where}.mlp")
            depth = len(stage.blocks) - bool(si) - (held is not None)
            if depth < 1:
                raise self.unsupported(f"stage {si} of {len(stage.blocks)} blocks (vitlab's stage needs one besides "
                                       "its first, the transition into it, and a widening last, held by the next)")
            stages.append({"depth": depth, "embed_dim": att, **entry})
        data["attention"], layers = common_and_layers([{"name": "pooling", "params": a["params"]} for a in reads],
                                                      "attention")
        data.update(stages=stages, layers=layers, mlp={"name": "mlp", "params": {"act": "gelu"}},
                    block={"name": "prenorm", "params": {"init_values": None}})
        data["final_norm"] = not self.is_id(m.norm)
        if data["final_norm"]:
            self.norm(m.norm, "norm")
        head = m.head
        fc = getattr(head, "fc", None)
        if not isinstance(head, nn.Sequential) or (not self.is_id(fc) and self.linear(fc, "head.fc").bias is None):
            raise self.unsupported("classifier head other than dropout and a linear layer with bias")
        if m.global_pool not in ("avg", "token", ""):
            raise self.unsupported(f"global_pool '{m.global_pool}'")  # pragma: no cover
        data["pool"] = {"name": {"avg": "avg", "token": "token", "": "none"}[m.global_pool]}
        data["num_classes"] = 0 if self.is_id(fc) else fc.out_features
        data["drop_rate"] = fmt_float(head.drop.p)
        data["norm"] = self.norm_selection()
        data["drop_path_rate"] = fmt_float(drops[-1])
        spec = self.validated(data)
        if spec.build_context().grid_size != grid:
            raise self.unsupported(f"patch embedding whose grid is not the image size over its stride ({grid})")
        return spec


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return spec.stages is not None and all(p.transition.name == "pooling_block" for p in spec.stage_plans()[1:])


def mvit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``MultiScaleVit`` (``cfg``: its ``MultiScaleVitCfg``) for a staged spec."""
    from timm.models.mvitv2 import MultiScaleVitCfg

    fail = refuser(spec, "MultiScaleVit")
    if spec.reg_tokens or spec.pre_norm or not spec.final_norm or spec.dynamic_img_size:
        raise fail("register tokens, pre_norm, dynamic_img_size or no final norm (MViTv2: none, no, no, a final norm)")
    pe = spec.patch_embed
    if pe.name != "conv_padded" or spec.patch_hw[0] != spec.patch_hw[1]:
        raise fail(f"patch embedding '{pe.name}' (MViTv2: conv_padded with a square kernel)")
    gh, gw = spec.build_context(ex.registry).grid_size
    stride = pe.params["stride"] or spec.patch_hw[0]
    if spec.img_hw != (gh * stride, gw * stride):
        raise fail(f"image size {spec.img_hw} other than the patch stride times the grid (timm's floor)")
    require(spec, ex.registry, fail, _FIXED, {}, "MViTv2")
    if spec.pool.name not in ("avg", "token", "none") or spec.pool.params.get("norm"):
        raise fail(f"pool '{spec.pool.name}' {spec.pool.params} (MViTv2: avg or token, no norm)")
    plans, stages = spec.block_plans(), spec.stage_plans()
    attn, stride_kv, stride_q = [], [], [1]
    # widen mlp anywhere is expand_attn=False: then no pooling block may widen in its attention
    widen = [st.transition.params.get("widen", "attn") == "mlp" for st in stages[1:]] + [False]
    if any(widen) and any(not w and nxt.embed_dim != st.embed_dim for st, nxt, w in zip(stages, stages[1:], widen)):
        raise fail("pooling blocks widening in the attention and in the held block's MLP in one model "
                   "(timm's expand_attn is one switch)")
    for st in stages:
        sels = [plans[i].selections for i in st.blocks]
        if any(s[k] != spec.selection(k) for s in sels for k in ("mlp", "norm", "block")) or any(
                plans[i].mlp_ratio != spec.mlp_ratio for i in st.blocks):
            raise fail(f"per-block overrides other than attention (stage {st.index})")
        if any(s["attention"].name != "pooling" for s in sels):
            raise fail(f"attention other than pooling (stage {st.index})")
        params = [dict(s["attention"].params) for s in sels]
        if st.index:
            params.insert(0, dict(st.transition.params["attention"]))
            stride_q.append(st.transition.params["stride_q"])
        if widen[st.index]:  # the next transition holds this stage's last block
            nxt = stages[st.index + 1].transition.params
            params.append(dict(nxt.get("in_attention") or nxt["attention"]))
            D, D_in = stages[st.index + 1].embed_dim, st.embed_dim
            if nxt.get("in_heads") != st.num_heads or int(D * spec.mlp_ratio) * D_in // D != int(D_in * spec.mlp_ratio):
                raise fail(f"a held block's heads or MLP width other than stage {st.index}'s")
        if len({p["stride_kv"] for p in params}) != 1:
            raise fail(f"key / value strides that differ within stage {st.index}")
        stride_kv.append(params[0]["stride_kv"])
        attn += [tuple(sorted((k, v) for k, v in p.items() if k != "stride_kv")) for p in params]
    if len(set(attn)) != 1:
        raise fail("attention params (kernel, mode, biases, residual pooling, rel_pos) that differ between blocks")
    ap = dict(attn[0])
    norm = spec.norm
    if norm.name != "layernorm" or not norm.params.get("bias", True):
        raise fail(f"norm '{norm.name}' {norm.params} (MViTv2: LayerNorm with bias)")
    cfg = MultiScaleVitCfg(
        depths=tuple(st.depth + bool(st.index) + widen[st.index] for st in stages), expand_attn=not any(widen),
        embed_dim=tuple(st.embed_dim for st in stages),
        num_heads=tuple(st.num_heads for st in stages), mlp_ratio=spec.mlp_ratio, qkv_bias=ap["qkv_bias"],
        use_cls_token=spec.class_token, residual_pooling=ap["residual_pooling"], mode=ap["mode"],
        kernel_qkv=(ap["kernel"],) * 2, stride_q=tuple((s, s) for s in stride_q),
        stride_kv=tuple((s, s) for s in stride_kv), stride_kv_adaptive=None,
        patch_kernel=spec.patch_hw, patch_stride=(stride,) * 2, patch_padding=(pe.params["padding"],) * 2,
        rel_pos_type="spatial" if ap["rel_pos"] else "none", norm_eps=norm.params["eps"],
    )
    if not pe.params.get("bias", True):
        raise fail("patch embedding without bias")
    return dict(cfg=cfg, img_size=spec.img_hw, in_chans=spec.in_chans, num_classes=spec.num_classes,
                global_pool={"none": ""}.get(spec.pool.name, spec.pool.name), drop_rate=spec.drop_rate,
                drop_path_rate=spec.drop_path_rate)


def mvit_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A staged vitlab MViTv2's weights in timm's names (``MVIT`` read backwards)."""
    mvit_kwargs(model.spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return MVIT.restore(sd, depths=[st.depth for st in model.spec.stage_plans()])


FAMILY = TimmFamily(
    "mvitv2", classes=("timm.models.mvitv2.MultiScaleVit",), reader=MvitReader, claims=_claims,
    timm_class="timm.models.mvitv2.MultiScaleVit", kwargs=mvit_kwargs, state_dict=mvit_state_dict, tables=(MVIT,),
)
