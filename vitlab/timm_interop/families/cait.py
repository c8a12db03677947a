"""timm's ``Cait`` (CaiT, Touvron et al. 2021) <-> a two-stage vitlab spec.

A CaiT runs self-attention blocks on the patches alone (no class token), then inserts a class
token that only it updates in a few class-attention blocks, then norms every token and classifies
the class token. In vitlab that is a spec with ``stages``:

* stage 0: the self-attention blocks, ``talking_heads`` attention (timm ``TalkingHeadAttn``) in
  ``prenorm`` blocks with layer scale (``LayerScaleBlock``);
* stage 1: led by the ``class_token`` transition, its blocks chosen by one ``layers`` entry:
  ``class_attn`` attention in ``cait_class`` blocks (``LayerScaleBlockClassAttn``).

The state-dict differences (``blocks_token_only.j`` is vitlab's block ``depth + j``, ``cls_token``
the transition's, bare ``gamma_1`` / ``gamma_2`` layer scales) are the ``CAIT`` table.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layout import format_indices
from ...spec import ViTSpec
from ..bridge import Family
from ..export import norm_layer, pair, refuser
from ..reader import BlockRead, Reader, fmt_float
from ..family import Exporting, TimmFamily
from .eva import EVA

# timm's Cait: the class-attention blocks (``blocks_token_only``) follow the self-attention blocks in
# vitlab's numbering, the class token is the ``class_token`` transition's into stage 1, and the
# layer scales are bare parameters as EVA's. Before EVA in the families, whose marker CaiT's
# checkpoints match.
CAIT = Family(
    "cait", marker=r"blocks_token_only\.",
    renames=(("cls_token", "transitions.1.cls_token"), *EVA.renames),
    appended="blocks_token_only",
)

# timm stores no layer-scale init, only the trained scales: any positive value builds the same layers
_INIT_VALUES = 1e-5


class CaitReader(Reader):
    """Reads a timm ``Cait`` instance (its modules and shapes, never its name)."""

    def _width(self, linear: nn.Linear, D: int, out: int, where: str) -> None:
        if (linear.in_features, linear.out_features) != (D, out):
            raise self.unsupported(f"attention projection of shape {linear.out_features}x{linear.in_features} "
                                   f"(embed_dim {D}) at {where}")

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        """``TalkingHeadAttn`` -> ``talking_heads``, ``ClassAttn`` -> ``class_attn``."""
        from timm.models.cait import ClassAttn, TalkingHeadAttn

        D, t = self.m.embed_dim, type(a)
        if D % a.num_heads:
            raise self.unsupported(f"{a.num_heads} heads not dividing embed_dim {D} at {where}")
        proj = self.linear(a.proj, f"{where}.proj")
        self._width(proj, D, D, f"{where}.proj")
        if t is TalkingHeadAttn:
            qkv = self.linear(a.qkv, f"{where}.qkv")
            self._width(qkv, D, 3 * D, f"{where}.qkv")
            for n in ("proj_l", "proj_w"):
                mix = self.linear(getattr(a, n), f"{where}.{n}")
                if (mix.in_features, mix.out_features) != (a.num_heads, a.num_heads) or mix.bias is None:
                    raise self.unsupported(f"talking-heads map other than heads x heads with bias at {where}.{n}")
            name, qkv_bias = "talking_heads", qkv.bias is not None
            extra = {"qk_norm": False}
        elif t is ClassAttn:
            q, k, v = (self.linear(getattr(a, n), f"{where}.{n}") for n in ("q", "k", "v"))
            for n, lin in zip("qkv", (q, k, v)):
                self._width(lin, D, D, f"{where}.{n}")
            qkv_bias = q.bias is not None
            if (k.bias is not None) != qkv_bias or (v.bias is not None) != qkv_bias:
                raise self.unsupported(f"bias on only some of q / k / v at {where}")
            name, extra = "class_attn", {}
        else:
            raise self.unsupported(f"attention layer {t.__name__} at {where}")
        params = {"qkv_bias": qkv_bias, "proj_bias": proj.bias is not None, **extra,
                  "attn_drop": fmt_float(a.attn_drop.p)}
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p, "name": name}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        """``LayerScaleBlock`` -> ``prenorm``, ``LayerScaleBlockClassAttn`` -> ``cait_class``."""
        from timm.models.cait import LayerScaleBlock, LayerScaleBlockClassAttn

        where = where or f"blocks.{i}"
        t = type(b)
        attn, mlp = self.parts(b, where, (LayerScaleBlock, LayerScaleBlockClassAttn))
        D = self.m.embed_dim
        if tuple(b.gamma_1.shape) != (D,) or tuple(b.gamma_2.shape) != (D,):
            raise self.unsupported(f"layer scale of another shape than ({D},) at {where}")
        block = {"name": "prenorm" if t is LayerScaleBlock else "cait_class", "params": {"init_values": _INIT_VALUES}}
        return BlockRead(attn, mlp, block, float(getattr(b.drop_path, "drop_prob", 0.0)))

    def spec(self) -> ViTSpec:
        from timm.models.cait import Cait

        m = self.m
        if type(m) is not Cait:
            raise self.unsupported(f"Cait subclass {type(m).__name__}")
        if m.cls_token is None or m.blocks_token_only is None:
            raise self.unsupported("class token or class-attention blocks pruned (prune_intermediate_layers)")
        if not len(m.blocks_token_only):
            raise self.unsupported("no class-attention blocks (depth_token_only=0: the class token is never attended)")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        blocks = self.head_and_blocks(data)  # the self-attention blocks, all alike
        D, depth = m.embed_dim, data.pop("depth")  # the stages give the depth
        heads, hidden = data["num_heads"], blocks[0].mlp["hidden"]
        tokens = [self.block(b, depth + j, where=f"blocks_token_only.{j}") for j, b in enumerate(m.blocks_token_only)]
        for j, b in enumerate(tokens):
            if b.settings() != tokens[0].settings():
                raise self.unsupported(f"class-attention blocks that differ (blocks_token_only.{j} is not configured "
                                       "like blocks_token_only.0)")
        first, cls = blocks[0], tokens[0]
        if first.block["name"] != "prenorm" or cls.block["name"] != "cait_class":
            raise self.unsupported("a class-attention block among the self-attention blocks, or the reverse")
        if cls.attn["heads"] != heads:
            raise self.unsupported("class-attention blocks with other heads than the self-attention blocks")
        if cls.attn["proj_drop"] != first.attn["proj_drop"]:
            raise self.unsupported("projection dropout in the self-attention blocks only (proj_drop_rate)")
        if (cls.mlp["name"], cls.mlp["params"]) != (first.mlp["name"], first.mlp["params"]):
            raise self.unsupported("class-attention blocks with another MLP than the self-attention blocks")
        if any(b.drop_path for b in blocks + tokens):
            raise self.unsupported("stochastic depth at one rate in every self-attention block (drop_path_rate; "
                                   "vitlab's grows linearly with depth)")

        if tuple(m.cls_token.shape) != (1, 1, D):
            raise self.unsupported(f"class token of shape {tuple(m.cls_token.shape)}")
        gh, gw = m.patch_embed.grid_size
        if m.pos_embed is None or tuple(m.pos_embed.shape) != (1, gh * gw, D):
            raise self.unsupported("position embedding of another shape than the patches'")
        data.update(class_token=False, reg_tokens=0, pos_embed={"name": "learned", "params": {"include_prefix": False}})
        stage = {"embed_dim": D, "num_heads": heads}
        data["stages"] = [{"depth": depth, **stage}, {"depth": len(tokens), **stage, "transition": "class_token"}]
        layer: dict[str, Any] = {"at": format_indices(list(range(depth, depth + len(tokens)))),
                                 "attention": {"name": "class_attn", "params": cls.attn["params"]},
                                 "block": cls.block}
        if cls.mlp["hidden"] != hidden:
            layer["mlp_ratio"] = self.mlp_ratio(cls.mlp["hidden"], "blocks_token_only.0.mlp")
        data["layers"] = [layer]

        if self.is_id(m.norm):
            raise self.unsupported("no final norm")
        self.norm(m.norm, "norm")
        pools = {"token": "token", "avg": "avg", "": "none"}
        if m.global_pool not in pools:
            raise self.unsupported(f"global_pool '{m.global_pool}'")
        data.update(pre_norm=False, final_norm=True, pool={"name": pools[m.global_pool]})
        return self.finish(data, blocks)


# --- spec -> timm --------------------------------------------------------------------------------

def _is_cait(spec: ViTSpec) -> bool:
    """A staged spec with CaiT's class-attention blocks (XCiT's class attention has its own block)."""
    return spec.stages is not None and any(p.selections["block"].name == "cait_class" for p in spec.block_plans())


def _differ(sel, name: str, want: dict[str, Any]) -> str | None:
    """Why selection ``sel`` is not component ``name`` with the params ``want`` (``None`` when it is)."""
    if sel.name != name:
        return f"'{sel.name}' (CaiT: {name})"
    bad = [k for k, v in want.items() if sel.params.get(k) != v]
    if not bad:
        return None
    have = ", ".join(f"{k}={sel.params.get(k)!r}" for k in bad)
    return f"'{name}' with {have} (CaiT: {', '.join(f'{k}={want[k]!r}' for k in bad)})"


def cait_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Cait`` (any ``cait_*`` name) for a CaiT-shaped spec."""
    from timm.layers import get_act_layer


    fail = refuser(spec, "Cait")
    stages = spec.stage_plans()
    if len(stages) != 2 or stages[1].transition.name != "class_token":
        raise fail("CaiT has two stages, the second led by a class_token transition")
    if (stages[0].embed_dim, stages[0].num_heads) != (stages[1].embed_dim, stages[1].num_heads):
        raise fail("stages of different widths or heads")
    if spec.class_token or spec.reg_tokens:
        raise fail("class or register tokens before the class-attention stage")
    plans = spec.block_plans()
    sa, ca = plans[0], plans[stages[1].start]
    for p in plans:
        like = sa if p.stage == 0 else ca
        if p.selections != like.selections or p.mlp_ratio != like.mlp_ratio:
            raise fail(f"per-block overrides within a stage (block {p.index}; timm configures the blocks of each "
                       "stage alike)")
    qkv_bias = sa.selections["attention"].params.get("qkv_bias")
    checks = {
        "attention": (sa.selections["attention"], "talking_heads",
                      {"proj_bias": True, "qk_norm": False, "kv_heads": None}),
        "class-attention stage's attention": (ca.selections["attention"], "class_attn",
                                              {"qkv_bias": qkv_bias, "proj_bias": True, "attn_drop": 0.0}),
        "block": (sa.selections["block"], "prenorm", {}),
        "class-attention stage's block": (ca.selections["block"], "cait_class", {}),
        "mlp": (sa.selections["mlp"], "mlp", {"bias": True, "norm": False}),
        "patch_embed": (spec.patch_embed, "conv", {"bias": True, "norm": False, "pad": False}),
        "pos_embed": (spec.pos_embed, "learned", {"include_prefix": False}),
    }
    for what, (sel, name, want) in checks.items():
        if (why := _differ(sel, name, want)) is not None:
            raise fail(f"{what} {why}")
    if ca.selections["mlp"] != sa.selections["mlp"] or ca.selections["norm"] != sa.selections["norm"] \
            or sa.selections["norm"] != spec.norm:
        raise fail("another MLP or norm in some blocks (CaiT: one MLP and one norm layer)")
    init_values = sa.selections["block"].params.get("init_values")
    if init_values is None or ca.selections["block"].params.get("init_values") is None:
        raise fail("blocks without layer scale (CaiT's blocks always scale both branches)")
    if spec.patch_embed.params.get("stride") not in (None, *spec.patch_hw):
        raise fail(f"patch stride {spec.patch_embed.params['stride']} other than the patch size")
    pools = {"token": "token", "avg": "avg", "none": ""}
    if spec.pool.name not in pools or spec.pool.params.get("norm"):
        raise fail(f"pool '{spec.pool.name}' {spec.pool.params} (CaiT: token, avg or none, without a pool norm)")
    if spec.pre_norm or not spec.final_norm or spec.dynamic_img_size:
        raise fail("pre_norm, no final norm, or dynamic_img_size")
    if spec.drop_path_rate or spec.proj_drop_rate:
        raise fail("drop_path_rate or proj_drop_rate (timm's CaiT applies them to the self-attention blocks only, "
                   "drop path at one rate)")
    return dict(
        img_size=pair(spec.img_size),
        patch_size=pair(spec.patch_size),
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
        global_pool=pools[spec.pool.name],
        embed_dim=stages[0].embed_dim,
        depth=stages[0].depth,
        num_heads=stages[0].num_heads,
        mlp_ratio=sa.mlp_ratio,
        qkv_bias=qkv_bias,
        drop_rate=spec.drop_rate,
        pos_drop_rate=spec.pos_drop_rate,
        proj_drop_rate=0.0,
        attn_drop_rate=sa.selections["attention"].params.get("attn_drop", 0.0),
        drop_path_rate=0.0,
        norm_layer=norm_layer(spec, fail),
        act_layer=get_act_layer(sa.selections["mlp"].params["act"]),
        init_values=init_values,
        depth_token_only=stages[1].depth,
        mlp_ratio_token_only=ca.mlp_ratio,
    )


def cait_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A CaiT-shaped vitlab model's weights in timm Cait's names (``CAIT`` read backwards)."""
    cait_kwargs(model.spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd["pos_embed"] = sd.pop("pos_embed.weight")  # (1, gh * gw, D): the patches only, as timm's
    return CAIT.restore(sd, lead=model.spec.stages[0].depth)


FAMILY = TimmFamily(
    "cait", classes=("timm.models.cait.Cait",), reader=CaitReader,
    claims=_is_cait, timm_class="timm.models.cait.Cait", kwargs=cait_kwargs, state_dict=cait_state_dict, tables=(CAIT,),
)
