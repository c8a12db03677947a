"""timm's ``ConVit`` (ConViT, d'Ascoli et al. 2021) <-> ``ViTSpec``.

ConViT's first ``local_up_to_layer`` blocks use gated positional self-attention (``gpsa``) on the
patches alone; its class token joins after them. In vitlab that is a staged recipe of one width:
stage 1 the GPSA blocks without a class token, stage 2 entered through the ``class_token``
transition, its blocks plain ``mhsa``; the attention that differs from the recipe's is a ``layers``
override. The learned position table covers the patches only. The state-dict difference (the class
token is the transition's) is the ``CONVIT`` family table; GPSA keeps timm's names.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import refuser
from ..reader import BlockRead, Reader, common_and_layers, fmt_float
from ..family import Exporting, TimmFamily

# timm's ConVit: the class token, inserted after the GPSA blocks, is the ``class_token``
# transition's into stage 1; GPSA keeps timm's names (``attn.qk``, ``attn.v``, ``attn.pos_proj``)
CONVIT = Family("convit", marker=r"blocks\.\d+\.attn\.(gating_param$|pos_proj\.)",
                renames=(("cls_token", "transitions.1.cls_token"),))

# --- timm -> spec -----------------------------------------------------------------------------------


class ConVitReader(Reader):
    """Reads a timm ``ConVit`` instance (its modules and shapes, never its name)."""

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.models.convit import GPSA, MHSA

        D, t = self.m.embed_dim, type(a)
        proj = self.linear(a.proj, f"{where}.proj")
        if proj.bias is None or proj.out_features != D:
            raise self.unsupported(f"attention output projection without bias or of another width at {where}")
        if t is GPSA:
            qk, v = self.linear(a.qk, f"{where}.qk"), self.linear(a.v, f"{where}.v")
            pos = self.linear(a.pos_proj, f"{where}.pos_proj")
            if (qk.out_features, v.out_features, pos.in_features, pos.out_features) != (2 * D, D, 3, a.num_heads) \
                    or pos.bias is None or tuple(a.gating_param.shape) != (a.num_heads,):
                raise self.unsupported(f"GPSA of other shapes at {where}")
            if (qk.bias is None) != (v.bias is None):
                raise self.unsupported(f"GPSA with a bias on only one of qk / v at {where}")
            params = {"qkv_bias": qk.bias is not None, "attn_drop": fmt_float(a.attn_drop.p),
                      "locality_strength": fmt_float(a.locality_strength)}
            name = "gpsa"
        elif t is MHSA:
            qkv = self.linear(a.qkv, f"{where}.qkv")
            if qkv.out_features != 3 * D:
                raise self.unsupported(f"attention width other than embed_dim {D} at {where}")
            params = {"qkv_bias": qkv.bias is not None, "proj_bias": True, "qk_norm": False,
                      "attn_drop": fmt_float(a.attn_drop.p)}
            name = "mhsa"
        else:
            raise self.unsupported(f"attention layer {t.__name__} at {where}")
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p, "name": name}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        from timm.models.convit import Block as ConVitBlock

        where = where or f"blocks.{i}"
        attn, mlp = self.parts(b, where, (ConVitBlock,))
        return BlockRead(attn, mlp, {"name": "prenorm", "params": {"init_values": None}},
                         float(getattr(b.drop_path, "drop_prob", 0.0)))

    def spec(self) -> ViTSpec:
        from timm.models.convit import ConVit

        m = self.m
        if type(m) is not ConVit:
            raise self.unsupported(f"ConVit subclass {type(m).__name__}")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed(), "reg_tokens": 0}
        grid = tuple(m.patch_embed.grid_size)
        blocks = [self.block(b, i) for i, b in enumerate(m.blocks)]
        depth, local = len(blocks), int(m.local_up_to_layer)
        if not depth:
            raise self.unsupported("model without blocks")
        if m.cls_token is None or tuple(m.cls_token.shape) != (1, 1, m.embed_dim):
            raise self.unsupported("ConViT without its one class token")
        if local >= depth:
            raise self.unsupported(f"class token never inserted (local_up_to_layer {local} >= depth {depth})")
        if any((b.attn["name"] == "gpsa") != (i < local) for i, b in enumerate(blocks)):
            raise self.unsupported(f"GPSA blocks other than the first local_up_to_layer ({local})")
        if local and grid[0] != grid[1]:
            raise self.unsupported(f"GPSA on a non-square {grid[0]}x{grid[1]} patch grid (timm's relative "
                                   "indices assume a square one)")
        for i, b in enumerate(blocks[1:], start=1):
            if b.settings(attn=("name", "params")) != blocks[0].settings(attn=("name", "params")):
                raise self.unsupported(f"blocks that differ other than in attention (block {i} is not configured "
                                       "like block 0)")
        first, D = blocks[0], m.embed_dim
        heads = first.attn["heads"]
        data.update(embed_dim=D, depth=depth, num_heads=heads,
                    mlp_ratio=self.mlp_ratio(first.mlp["hidden"], "blocks.0.mlp"),
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]}, block=first.block)
        data["attention"], data["layers"] = common_and_layers(
            [{"name": b.attn["name"], "params": b.attn["params"]} for b in blocks], "attention")
        if local:  # the class token joins after the GPSA blocks: the second stage's transition
            data["class_token"] = False
            data["stages"] = [{"depth": local, "embed_dim": D, "num_heads": heads},
                              {"depth": depth - local, "embed_dim": D, "num_heads": heads,
                               "transition": {"name": "class_token"}}]
        else:  # no GPSA: a class token from the start, without a position of its own
            data["class_token"] = True

        if not m.use_pos_embed:
            data["pos_embed"] = {"name": "none"}
        elif tuple(m.pos_embed.shape) == (1, grid[0] * grid[1], D):
            data["pos_embed"] = {"name": "learned", "params": {"include_prefix": False}}
        else:
            raise self.unsupported(f"position embedding of shape {tuple(m.pos_embed.shape)}")
        data["pre_norm"] = False
        self.norm(m.norm, "norm")
        data["final_norm"] = True
        if m.global_pool not in ("token", "avg", ""):
            raise self.unsupported(f"global_pool '{m.global_pool}'")
        data["pool"] = {"name": {"token": "token", "avg": "avg", "": "none"}[m.global_pool]}
        data["num_classes"] = self.num_classes(D)
        data["norm"] = self.norm_selection()
        data["drop_rate"] = fmt_float(m.head_drop.p)
        data["pos_drop_rate"] = fmt_float(m.pos_drop.p)
        data["proj_drop_rate"] = fmt_float(first.attn["proj_drop"])
        data["drop_path_rate"] = fmt_float(blocks[-1].drop_path) if depth > 1 else 0.0
        data["dynamic_img_size"] = False  # timm's model takes its one image size

        return self.validated(data)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return any(p.selections["attention"].name == "gpsa" for p in spec.block_plans())


def convit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``ConVit`` (any ``convit_*`` name) for ``spec``."""
    from timm.layers import LayerNorm

    fail = refuser(spec, "ConVit")
    stages = spec.stages or []
    if (len(stages) != 2 or spec.class_token or spec.reg_tokens or stages[1].transition.name != "class_token"
            or {(s.embed_dim, s.num_heads) for s in stages} != {(spec.embed_dim, spec.num_heads)}):
        raise fail("other than two stages of one width, the second entered through the class_token transition, "
                   "without other prefix tokens")
    local = stages[0].depth
    pe, pos, mlp, norm = spec.patch_embed, spec.pos_embed, spec.mlp, spec.norm
    if pe.name != "conv" or not pe.params.get("bias", True) or pe.params.get("norm") or pe.params.get("pad") \
            or pe.params.get("stride") not in (None, *spec.patch_hw):
        raise fail(f"patch embedding '{pe.name}' {pe.params} (ConViT: a plain conv with bias)")
    if pos.name not in ("learned", "none"):
        raise fail(f"position encoding '{pos.name}'")
    if mlp.name != "mlp" or mlp.params != {**mlp.params, "act": "gelu", "bias": True, "norm": False}:
        raise fail(f"mlp '{mlp.name}' {mlp.params} (ConViT: timm's Mlp with GELU)")
    if spec.block.name != "prenorm" or spec.block.params.get("init_values") is not None:
        raise fail(f"block '{spec.block.name}' {spec.block.params} (ConViT: pre-norm without layer scale)")
    if norm.name != "layernorm" or not norm.params.get("bias", True):
        raise fail(f"norm '{norm.name}' {norm.params} (ConViT: LayerNorm)")
    if spec.pre_norm or not spec.final_norm or spec.pool.name not in ("token", "avg", "none") \
            or spec.pool.params.get("norm"):
        raise fail("pre_norm, no final norm or a pool other than token, avg or none without a norm")

    gpsa, mhsa = set(), set()
    for plan in spec.block_plans():
        sel = plan.selections["attention"]
        others = {k: v for k, v in plan.selections.items() if k != "attention"}
        if others != {k: spec.selection(k) for k in others} or plan.mlp_ratio != spec.mlp_ratio:
            raise fail(f"per-block overrides other than attention (block {plan.index})")
        want = "gpsa" if plan.index < local else "mhsa"
        if sel.name != want:
            raise fail(f"attention '{sel.name}' at block {plan.index} (ConViT: gpsa in the first stage, mhsa after)")
        (gpsa if want == "gpsa" else mhsa).add(tuple(sorted(sel.params.items())))
    mp = dict(mhsa.pop()) if len(mhsa) == 1 else None
    gp = dict(gpsa.pop()) if len(gpsa) == 1 else None
    if (gp is None or mp is None or mp != {**mp, "proj_bias": True, "qk_norm": False, "kv_heads": None}
            or (mp["qkv_bias"], mp["attn_drop"]) != (gp["qkv_bias"], gp["attn_drop"])):
        raise fail("attention settings that differ between blocks, or mhsa with qk_norm, kv_heads or without "
                   "output bias")
    return dict(
        img_size=spec.img_size if isinstance(spec.img_size, int) else tuple(spec.img_size),
        patch_size=spec.patch_size if isinstance(spec.patch_size, int) else tuple(spec.patch_size),
        in_chans=spec.in_chans, num_classes=spec.num_classes,
        global_pool={"token": "token", "avg": "avg", "none": ""}[spec.pool.name],
        embed_dim=spec.embed_dim // spec.num_heads,  # timm's ConVit takes the width per head
        depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=gp["qkv_bias"],
        drop_rate=spec.drop_rate, pos_drop_rate=spec.pos_drop_rate, proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=gp["attn_drop"], drop_path_rate=spec.drop_path_rate,
        norm_layer=functools.partial(LayerNorm, eps=norm.params["eps"]), local_up_to_layer=local,
        locality_strength=gp["locality_strength"], use_pos_embed=pos.name == "learned",
    )


def convit_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A vitlab ConViT's weights in timm's names (``CONVIT`` read backwards)."""
    convit_kwargs(model.spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if "pos_embed.weight" in sd:
        sd["pos_embed"] = sd.pop("pos_embed.weight")
    return CONVIT.restore(sd)


FAMILY = TimmFamily(
    "convit", classes=("timm.models.convit.ConVit",), reader=ConVitReader,
    claims=_claims,
    timm_class="timm.models.convit.ConVit", kwargs=convit_kwargs, state_dict=convit_state_dict, tables=(CONVIT,),
)
