"""timm's ``VOLO`` (VOLO, Yuan et al. 2021; ``volo``) <-> a staged vitlab spec of three stages.

* stage 0: timm's outlooker stage (``network.0``): ``prenorm`` blocks of ``outlook`` attention on
  the ``volo_stem`` patch grid, no prefix tokens and no position encoding (``pos_embed: none``);
* stage 1: led by ``volo_downsample`` (timm's ``network.1``, a 2x2 convolution of stride 2, then
  its ``pos_embed`` table (1, gh, gw, D), added right after it as timm adds it before
  ``network.2``), every timm transformer stage after it (``network.2`` ...: plain ``prenorm`` blocks
  of ``mhsa``, all of one width), read as one stage;
* stage 2: led by CaiT's ``class_token`` transition (timm's ``cls_token``), the ``post_network``
  class-attention blocks (``ClassBlock``: ``cait_class`` blocks of ``class_attn``, no layer scale).

Then the final norm over every token and ``token_aux``: the class token's logits plus half the
maximum of the patch tokens' ``aux_head`` logits (``token`` without the aux head).

The state-dict differences are the ``VOLO`` table: blocks numbered per timm stage (the transformer
stages' run on as one), the downsample, position table, class token and aux head in the
transitions and the head, and the class attention's fused ``kv`` split into ``k`` and ``v``
(``VOLO_KV``). Written back, the transformer blocks are one timm stage (``layers`` of two).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import Family, Split, SplitFamily
from ..export import norm_layer, pair, refuser
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, fmt_float
from ..staged import StagedReader, conv_geometry, drop_path_of, stage_values

_BLOCK = re.compile(r"network\.(\d+)\.(\d+)\.(.+)$")  # block j of timm stage n (network.1 is the downsample)
_POST = re.compile(r"post_network\.(\d+)\.(.+)$")  # the class-attention blocks
_STAGED = re.compile(r"stages\.(\d+)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class VoloTable(Family):
    """VOLO's blocks, by timm stage (``network.{n}.{j}``, ``post_network.{j}``), seen as three
    stages (``stages.{stage}.{j}``) before the renames apply: ``network.0`` is stage 0, every
    ``network.{n}`` after the downsample (n >= 2) runs on as stage 1, ``post_network`` is stage 2."""

    def adapt(self, src, depths: Sequence[int] | None = None):
        lengths: dict[int, int] = {}  # timm stage -> its blocks
        for key in src.keys():
            if m := _BLOCK.match(key):
                n = int(m.group(1))
                lengths[n] = max(lengths.get(n, 0), int(m.group(2)) + 1)
        start, at = {}, 0
        for n in sorted(k for k in lengths if k >= 2):  # the transformer stages run on as one
            start[n], at = at, at + lengths[n]
        names = {}  # name seen -> the source's
        for key in src.keys():
            if m := _POST.match(key):
                names[f"stages.2.{m.group(1)}.{m.group(2)}"] = key
            elif (m := _BLOCK.match(key)) and m.group(1) != "1":
                n, j = int(m.group(1)), int(m.group(2))
                names[f"stages.0.{j}.{m.group(3)}" if n == 0 else f"stages.1.{start[n] + j}.{m.group(3)}"] = key
            else:
                names[key] = key
        return super().adapt(src.replaced({k: src.shape(v) for k, v in names.items()}, lambda k: src.get(names[k])),
                             depths)

    def restore(self, sd, lead=None, *, into=None, inert_zero: bool = False, depths=None):
        sd = VOLO_KV.restore(sd)  # the class attention's k and v joined as timm's kv (no renames)
        out = {}
        for key, value in super().restore(sd, depths=depths).items():
            if (m := _STAGED.match(key)) is not None:
                s, j, rest = int(m.group(1)), m.group(2), m.group(3)
                key = {0: f"network.0.{j}.{rest}", 1: f"network.2.{j}.{rest}", 2: f"post_network.{j}.{rest}"}[s]
            out[key] = value
        return out


VOLO = VoloTable(
    "volo", marker=r"(post_)?network\.\d+\.",
    renames=(("stages.{stage}.{j}.{rest}", "blocks.{block}.{rest}"), ("pos_embed", "transitions.1.pos_embed"),
             ("network.1.{rest}", "transitions.1.{rest}"), ("cls_token", "transitions.2.cls_token"),
             ("aux_head.{rest}", "head.aux.{rest}")),
)
# timm's ClassAttention projects keys and values with one ``kv``; vitlab's class_attn keeps them apart
VOLO_KV = SplitFamily(
    "volo_kv", marker=r"(?!)",  # split by the loader from VOLO's renamed keys, joined by VOLO's restore
    split=tuple(Split(f"blocks.{{block}}.attn.kv.{p}", (f"blocks.{{block}}.attn.k.{p}", f"blocks.{{block}}.attn.v.{p}"))
                for p in ("weight", "bias")),
    note="split from timm's fused kv (keys, values)",
)

# what every VOLO block and the model around them are apart from widths: kind -> (component, params)
_OUTLOOK = {"kernel_size": 3, "padding": 1, "stride": 2}  # timm's VOLO builds every outlooker so


# --- timm -> spec ------------------------------------------------------------------------------------

class VoloReader(StagedReader):
    """Reads a timm ``VOLO`` instance (its modules and shapes, never its name)."""

    timm_module, model_cls = "timm.models.volo", "VOLO"

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        """``OutlookAttention`` -> ``outlook``, ``Attention`` -> ``mhsa``, ``ClassAttention`` -> ``class_attn``."""
        proj = self.linear(a.proj, f"{where}.proj")
        if proj.in_features != dim or proj.out_features != dim or dim % a.num_heads:
            raise self.unsupported(f"attention width other than the stage's {dim} at {where}")
        params: dict[str, Any] = {"attn_drop": fmt_float(a.attn_drop.p)}
        if self.is_timm(a, "OutlookAttention"):
            v, w = self.linear(a.v, f"{where}.v"), self.linear(a.attn, f"{where}.attn")
            k = a.kernel_size
            if w.out_features != k ** 4 * a.num_heads or w.bias is None or proj.bias is None:
                raise self.unsupported(f"outlook weights other than (k²)² per head with bias at {where}")
            name = "outlook"
            params.update(kernel_size=k, padding=a.padding, stride=a.stride, qkv_bias=v.bias is not None)
        elif self.is_timm(a, "Attention"):
            qkv = self.linear(a.qkv, f"{where}.qkv")
            name = "mhsa"
            params.update(qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None, qk_norm=False)
        elif self.is_timm(a, "ClassAttention"):
            q, kv = self.linear(a.q, f"{where}.q"), self.linear(a.kv, f"{where}.kv")
            if a.head_dim * a.num_heads != dim or (q.bias is None) != (kv.bias is None):
                raise self.unsupported(f"class attention with head_dim other than width / heads, or a bias on only "
                                       f"one of q / kv at {where}")
            name = "class_attn"
            params.update(qkv_bias=q.bias is not None, proj_bias=proj.bias is not None)
        else:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        return {"name": name, "heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        """``Outlooker`` and ``Transformer`` -> ``prenorm``, ``ClassBlock`` -> ``cait_class``."""
        kinds = {"Outlooker": "prenorm", "Transformer": "prenorm", "ClassBlock": "cait_class"}
        kind = next((n for n in kinds if self.is_timm(b, n)), None)
        if kind is None:
            raise self.unsupported(f"block type {type(b).__name__} at {where}")
        attn, mlp = self.parts(b, where, dim=dim)
        return BlockRead(attn, mlp, {"name": kinds[kind], "params": {"init_values": None}}, drop_path_of(b))

    def embedding(self) -> dict:
        """The stem and projection (timm's VOLO ``PatchEmbed``) and the image size its position table is for."""
        m, pe = self.m, self.m.patch_embed
        conv = pe.conv
        if not self.is_timm(pe, "PatchEmbed") or type(conv) is not nn.Sequential or len(conv) != 9:
            raise self.unsupported("patch embedding without VOLO's convolutional stem (stem_conv=False)")
        hidden = conv[0].out_channels
        want = [(7, 2, 3), (3, 1, 1), (3, 1, 1)]
        for c, geometry in zip((0, 3, 6), want):
            mod, bn, act = conv[c], conv[c + 1], conv[c + 2]
            if (type(mod) is not nn.Conv2d or mod.bias is not None or mod.groups != 1 or mod.out_channels != hidden
                    or (mod.kernel_size[0], mod.stride[0], mod.padding[0]) != geometry
                    or len({*mod.kernel_size}) != 1 or len({*mod.stride}) != 1 or type(bn) is not nn.BatchNorm2d
                    or type(act) is not nn.ReLU or bn.eps != 1e-5 or not bn.affine):
                raise self.unsupported(f"stem other than VOLO's three convolutions of stride 2, 1, 1 with "
                                       f"BatchNorm and ReLU at patch_embed.conv.{c}")
        k, s, p = conv_geometry(self, pe.proj, "patch_embed.proj")
        if k != s or p:
            raise self.unsupported("patch projection with kernel != stride or padding")
        down = m.network[1] if len(m.network) > 1 else None
        if (m.pos_embed is None or down is None or not self.is_timm(down, "Downsample")
                or conv_geometry(self, down.proj, "network.1.proj") != (2, 2, 0) or m.pooling_scale != 2):
            raise self.unsupported("layout other than outlookers, a 2x2 downsample, then the position table "
                                   "(downsamples / outlook_attention other than timm's defaults)")
        _, gh, gw, _ = m.pos_embed.shape
        patch = 2 * k  # the stem halves the image first
        h, w = gh * 2 * patch, gw * 2 * patch  # the table's grid is the image's / patch / 2 (timm's img_size)
        return {"img_size": int(h) if h == w else [int(h), int(w)], "patch_size": patch,
                "in_chans": conv[0].in_channels,
                "patch_embed": {"name": "volo_stem", "params": {"hidden_dim": hidden}}}

    def spec(self) -> ViTSpec:
        m = self.own_model()
        data: dict[str, Any] = {"name": self.name, **self.embedding(), "class_token": False, "reg_tokens": 0,
                                "pos_embed": {"name": "none"}, "pre_norm": False}
        if m.post_network is None or m.cls_token is None or not len(m.post_network):
            raise self.unsupported("no class token or class-attention blocks (post_layers=None, or pruned)")
        if m.global_pool != "token":
            raise self.unsupported(f"global_pool '{m.global_pool}' (VOLO: token)")
        if m.pos_drop.p:
            raise self.unsupported("position dropout (pos_drop_rate: timm's applies after the downsample)")
        net, blocks, stages = m.network, [], []
        outlook, transformers = net[0], list(net[2:])
        if not all(type(s) is nn.Sequential for s in [outlook, *transformers]) or not transformers:
            raise self.unsupported("stages other than the outlookers, the downsample and transformer stages")
        stages.append(self.stage(0, outlook, m.patch_embed.proj.out_channels, "network.0", blocks))
        width = m.pos_embed.shape[-1]
        before = len(blocks)
        for n, mods in enumerate(transformers, start=2):
            if not len(mods):
                continue
            read = self.stage(n, mods, width, f"network.{n}", blocks)
            if read["embed_dim"] != width or read["num_heads"] != blocks[before][0].attn["heads"]:
                raise self.unsupported(f"transformer stages of different widths or heads (network.{n})")
        if len(blocks) == before:
            raise self.unsupported("no transformer blocks")
        stages.append({"depth": len(blocks) - before, "embed_dim": width,
                       "num_heads": blocks[before][0].attn["heads"],
                       "transition": {"name": "volo_downsample", "params": {"patch": 2, "pos_embed": True}}})
        if tuple(m.cls_token.shape) != (1, 1, width):
            raise self.unsupported(f"class token of shape {tuple(m.cls_token.shape)}")
        stages.append({**self.stage(2, m.post_network, width, "post_network", blocks), "transition": "class_token"})
        stage_of = [s for s, st in enumerate(stages) for _ in range(st["depth"])]
        want = {0: ("outlook", "prenorm"), 1: ("mhsa", "prenorm"), 2: ("class_attn", "cait_class")}
        if any(want[s] != (b.attn["name"], b.block["name"]) for s, (b, _, _) in zip(stage_of, blocks)):
            raise self.unsupported("outlook attention outside the first stage, or class attention outside the "
                                   "post network")
        if any(b.drop_path for b, _, _ in blocks):
            raise self.unsupported("stochastic depth (drop_path_rate: timm's VOLO leaves the outlookers and class "
                                   "blocks without it)")
        data["attention"], layers = self.per_block("attention", [{"name": b.attn["name"], "params": b.attn["params"]}
                                                                 for b, _, _ in blocks])
        data["block"], block_layers = self.per_block("block", [b.block for b, _, _ in blocks])
        data["mlp_ratio"], ratio_layers = self.per_block("mlp_ratio", self.mlp_ratios(blocks))
        first = blocks[0][0]
        for b, _, where in blocks:
            if b.mlp["name"] != first.mlp["name"] or b.mlp["params"] != first.mlp["params"]:
                raise self.unsupported(f"MLPs that differ other than in width ({where})")
        data.update(stages=stages, layers=layers + block_layers + ratio_layers,
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]}, final_norm=True)
        self.norm(m.norm, "norm")
        data.update(self.linear_head(), pool={"name": "token_aux" if m.aux_head is not None else "token"})
        if m.aux_head is not None and (self.linear(m.aux_head, "aux_head").bias is None
                                       or m.aux_head.out_features != data["num_classes"]):
            raise self.unsupported("aux head without bias or of other classes than the head")
        return self.finish_staged(data, blocks)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return spec.stages is not None and any(p.transition is not None and p.transition.name == "volo_downsample"
                                           for p in spec.stage_plans())


def _want(fail, what: str, sel, name: str, params: dict[str, Any]) -> None:
    bad = {k: sel.params.get(k) for k, v in params.items() if sel.params.get(k) != v}
    if sel.name != name or bad:
        raise fail(f"{what} '{sel.name}' {bad or ''} (VOLO: '{name}' with {params})")


def volo_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``VOLO`` (any ``volo_*`` name) for a three-stage spec."""
    fail = refuser(spec, "VOLO")
    stages, plans = spec.stage_plans(), spec.block_plans()
    if len(stages) != 3 or stages[2].transition.name != "class_token":
        raise fail("VOLO has three stages: outlookers, then transformers led by volo_downsample, then class "
                   "attention led by class_token")
    down = stages[1].transition
    if down.params.get("patch", 2) != 2 or down.params.get("pos_embed", True) is not True:
        raise fail(f"downsample {down.params} (VOLO: patch 2 and its position table)")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or not spec.final_norm or spec.dynamic_img_size:
        raise fail("prefix tokens, pre_norm, dynamic_img_size or no final norm (VOLO: none, none, no, a final norm)")
    if (stages[1].embed_dim, stages[1].num_heads) != (stages[2].embed_dim, stages[2].num_heads):
        raise fail("class-attention blocks of other width or heads than the transformer blocks")
    _want(fail, "patch_embed", spec.patch_embed, "volo_stem", {})
    _want(fail, "pos_embed", spec.pos_embed, "none", {})
    pools = {"token_aux": True, "token": False}
    if spec.pool.name not in pools or spec.pool.params.get("norm"):
        raise fail(f"pool '{spec.pool.name}' {spec.pool.params} (VOLO: token_aux or token, without a pool norm)")
    first = plans[0].selections["attention"].params
    qkv_bias, attn_drop = first.get("qkv_bias", False), first.get("attn_drop", 0.0)
    want = {0: ("outlook", {**_OUTLOOK, "qkv_bias": qkv_bias, "attn_drop": attn_drop}, "prenorm"),
            1: ("mhsa", {"qkv_bias": qkv_bias, "proj_bias": True, "qk_norm": False, "kv_heads": None,
                         "attn_drop": attn_drop}, "prenorm"),
            2: ("class_attn", {"qkv_bias": qkv_bias, "proj_bias": True, "attn_drop": attn_drop}, "cait_class")}
    for p in plans:
        attn, params, block = want[p.stage]
        _want(fail, f"block {p.index}'s attention", p.selections["attention"], attn, params)
        _want(fail, f"block {p.index}'s block", p.selections["block"], block,
              {"init_values": None, **({"attn_only_layer_scale": False} if block == "prenorm" else {})})
        _want(fail, f"block {p.index}'s mlp", p.selections["mlp"], "mlp", {"act": "gelu", "bias": True, "norm": False,
                                                                            "out_bias": None})
        if p.selections["norm"] != spec.norm:
            raise fail(f"another norm in block {p.index}")
    ratios = stage_values(spec, fail, "an MLP ratio", lambda p: p.mlp_ratio)
    if ratios[2] != ratios[1]:
        raise fail("class-attention blocks with another MLP ratio than the transformer blocks")
    if spec.drop_path_rate or spec.proj_drop_rate or spec.pos_drop_rate:
        raise fail("drop_path_rate, proj_drop_rate or pos_drop_rate (timm's VOLO applies them elsewhere)")
    if spec.patch_hw[0] != spec.patch_hw[1]:
        raise fail("non-square patches")
    grid = spec.stage_contexts(ex.registry, device="meta")[1].grid_size
    img = (grid[0] * 2 * spec.patch_hw[0], grid[1] * 2 * spec.patch_hw[0])
    if img != tuple(spec.img_hw):
        raise fail(f"image size {spec.img_hw} other than a multiple of twice the patch size (VOLO: the position "
                   "table's grid is the image's / patch / 2)")
    return dict(
        layers=(stages[0].depth, stages[1].depth), img_size=pair(spec.img_size), in_chans=spec.in_chans,
        num_classes=spec.num_classes, global_pool="token", patch_size=spec.patch_hw[0],
        stem_hidden_dim=spec.patch_embed.params.get("hidden_dim", 64),
        embed_dims=(stages[0].embed_dim, stages[1].embed_dim), num_heads=(stages[0].num_heads, stages[1].num_heads),
        downsamples=(True, False), outlook_attention=(True, False), mlp_ratio=tuple(ratios[:2]), qkv_bias=qkv_bias,
        drop_rate=spec.drop_rate, attn_drop_rate=attn_drop, norm_layer=norm_layer(spec, fail),
        post_layers=("ca",) * stages[2].depth, use_aux_head=pools[spec.pool.name],
    )


def volo_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A VOLO-shaped vitlab model's weights in timm's names (``VOLO`` read backwards)."""
    volo_kwargs(model.spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return VOLO.restore(sd, depths=[st.depth for st in model.spec.stage_plans()])


FAMILY = TimmFamily(
    "volo", classes=("timm.models.volo.VOLO",), reader=VoloReader, claims=_claims,
    timm_class="timm.models.volo.VOLO", kwargs=volo_kwargs, state_dict=volo_state_dict, tables=(VOLO, VOLO_KV),
)
