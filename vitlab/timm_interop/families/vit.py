"""timm's ``VisionTransformer`` and DeiT's distilled ``VisionTransformerDistilled`` (the family
every spec no other family claims goes back to) <-> ``ViTSpec``.

Besides ``Block`` and ``ResPostBlock`` (``reader.Reader``) a ViT may have parallel blocks:
``ParallelThingsBlock`` (``parallel_branches``) or ``ParallelScalingBlock`` and its differential
twin (``parallel``), whose fused projections are ``PARALLEL``'s splits. The export fills timm's
slots from per-slot tables (``SLOT_CLASSES``); a plugin twin fills its own slot.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import nn

from ...errors import WeightsError
from ...spec import ViTSpec
from ..bridge import Family, Split, SplitFamily
from ..equivalents import SLOTS, bound_layer, renames
from ..export import check_uniform_blocks, export_state_dict, norm_layer, pair, refuser
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, Reader, fmt_float

# DeiT's distilled models: the distillation token is vitlab's first register token, its
# classifier the distilled pool's ``head.dist``
DEIT_DISTILLED = Family(
    "deit_distilled", marker=r"dist_token$",
    renames=(("dist_token", "reg_token"), ("head_dist.{rest}", "head.dist.{rest}")),
)

# timm's ParallelScalingBlock and DiffParallelScalingBlock: one norm, one input projection
# [MLP fc1 | q k v], the attention's norms and lambdas in the block itself, the output projections
# apart or fused (over [attention | MLP] features, one bias). Read, its one layer scale is the block's
# ``shared_layer_scale`` and a fused output's one bias the attention's (the MLP's ``out_bias: false``).
# What names cannot say is code below: into a spec with two layer scales timm's one serves both
# (on export ``ls2`` must equal ``ls1``), the fused output's bias serves either branch (summed on
# export), and an MLP bias one side has and the other lacks is zero (``_load_parallel``, ``_parallel_values``).
PARALLEL = SplitFamily(
    "parallel", marker=r"(?!)",  # read by the vit family's load fixups, so the report keeps timm's names
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
    note="split from ParallelScalingBlock's fused projection",
)


# --- timm -> spec --------------------------------------------------------------------------------

class VitReader(Reader):
    """Reads a timm ``VisionTransformer`` / ``VisionTransformerDistilled`` instance."""

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        """timm's parallel blocks; any other as ``Reader.block``."""
        from timm.models.vision_transformer import (
            DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock,
        )

        where = where or f"blocks.{i}"
        t = type(b)
        D = dim or self.m.embed_dim
        if t is ParallelThingsBlock:
            return self.parallel_things(b, i, where, D)
        if t not in (ParallelScalingBlock, DiffParallelScalingBlock):
            return super().block(b, i, dim, where)

        in_proj = self.linear(b.in_proj, f"{where}.in_proj")
        hidden = in_proj.out_features - 3 * D
        if list(b.in_split) != [hidden, D, D, D] or hidden <= 0:
            raise self.unsupported(f"ParallelScalingBlock split {b.in_split} at {where}")
        self.norm(b.in_norm, f"{where}.in_norm")
        qk_norm = not self.is_id(b.q_norm)
        if qk_norm:
            self.norm(b.q_norm, f"{where}.q_norm")
            self.norm(b.k_norm, f"{where}.k_norm")
        if b.out_proj is not None:  # one output bias, the attention's; the MLP's fc2 has none
            out = self.linear(b.out_proj, f"{where}.out_proj")
            proj_bias, mlp_out_bias = out.bias is not None, False
        else:
            a_out = self.linear(b.attn_out_proj, f"{where}.attn_out_proj")
            m_out = self.linear(b.mlp_out_proj, f"{where}.mlp_out_proj")
            proj_bias = mlp_out_bias = a_out.bias is not None
            if proj_bias != (m_out.bias is not None):
                raise self.unsupported(f"bias on only one output projection at {where}")
        attn = {"heads": b.num_heads, "proj_drop": b.mlp_drop.p,
                "params": {"qkv_bias": in_proj.bias is not None, "proj_bias": proj_bias, "qk_norm": qk_norm,
                           "attn_drop": fmt_float(b.attn_drop.p)}}
        if t is DiffParallelScalingBlock:  # the attention half is differential, its q / k split in two
            attn["name"] = "mhsa_diff"
            attn["params"].update(self.differential(b, where, i), subln=False)
        # the MLP's fc1 always has a bias (in_proj's bias or mlp_bias); its fc2 one only with an
        # output projection of its own that has one
        act = self.act(b.mlp_act, f"{where}.mlp_act")
        mlp = {"name": "mlp", "params": {"bias": True, "out_bias": None if mlp_out_bias else False, "norm": False,
                                         "act": act}, "hidden": hidden, "drop": b.mlp_drop.p}
        ls = self.layer_scale(b.ls, f"{where}.ls")  # one over the sum of both branches
        block = {"name": "parallel", "params": {"init_values": ls, "shared_norm": True, "shared_layer_scale": True}}
        drop_path = getattr(b.drop_path, "drop_prob", 0.0)
        return BlockRead(attn, mlp, block, float(drop_path))

    def parallel_things(self, b: nn.Module, i: int, where: str, dim: int) -> BlockRead:
        """timm's ``ParallelThingsBlock``: ``num_parallel`` branches of (norm, attn, ls) side by side,
        then as many of (norm, mlp, ls); every branch configured alike (``parallel_branches``)."""
        branches = []
        for j in range(b.num_parallel):
            a, f = b.attns[j], b.ffns[j]
            attn = self.attention(a.attn, f"{where}.attns.{j}.attn", dim)
            if attn["name"] == "mhsa_diff":
                self.differential(a.attn, f"{where}.attns.{j}.attn", i)
            mlp = self.mlp(f.mlp, f"{where}.ffns.{j}.mlp", dim)
            self.norm(a.norm, f"{where}.attns.{j}.norm")
            self.norm(f.norm, f"{where}.ffns.{j}.norm")
            ls = self.layer_scale(a.ls, f"{where}.attns.{j}.ls")
            if (ls is None) != (self.layer_scale(f.ls, f"{where}.ffns.{j}.ls") is None):
                raise self.unsupported(f"layer scale on only one branch at {where}")
            branches.append((attn, mlp, ls))
        if any(br != branches[0] for br in branches[1:]):
            raise self.unsupported(f"parallel branches configured differently at {where}")
        attn, mlp, ls = branches[0]
        block = {"name": "parallel_branches", "params": {"branches": b.num_parallel, "init_values": ls}}
        return BlockRead(attn, mlp, block, float(getattr(b.attns[0].drop_path, "drop_prob", 0.0)))

    def spec(self) -> ViTSpec:
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer

        m = self.m
        distilled = type(m) is VisionTransformerDistilled
        if type(m) is not VisionTransformer and not distilled:
            raise self.unsupported(f"VisionTransformer subclass {type(m).__name__}")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        blocks = self.head_and_blocks(data)
        if not self.is_id(getattr(m, "patch_drop", None)):
            raise self.unsupported("patch dropout (patch_drop_rate)")
        D, heads, hidden = m.embed_dim, data["num_heads"], blocks[0].mlp["hidden"]

        data["class_token"] = m.cls_token is not None
        data["reg_tokens"] = int(getattr(m, "num_reg_tokens", 0) or 0)
        if distilled:  # the distillation token is the first register token (``DEIT_DISTILLED``)
            if data["reg_tokens"] or m.no_embed_class:
                raise self.unsupported("distillation token with register tokens or no_embed_class")
            if m.distilled_training:
                raise self.unsupported("distilled training mode (separate class and distillation logits)")
            data["reg_tokens"] = 1
        prefix = int(data["class_token"]) + data["reg_tokens"]
        if data["class_token"] != bool(m.has_class_token or distilled) or m.num_prefix_tokens != prefix:
            raise self.unsupported("prefix tokens other than one class token and register tokens")
        grid = m.patch_embed.grid_size
        if m.pos_embed is None:
            data["pos_embed"] = {"name": "none"}
        else:
            include_prefix = not m.no_embed_class
            expected = grid[0] * grid[1] + (m.num_prefix_tokens if include_prefix else 0)
            if tuple(m.pos_embed.shape) != (1, expected, D):
                raise self.unsupported(f"position embedding of shape {tuple(m.pos_embed.shape)}")
            data["pos_embed"] = {"name": "learned", "params": {"include_prefix": include_prefix}}

        pool, final, fc_as_final = self.norms_and_pool(data, heads, hidden)
        if distilled:
            if pool["name"] != "token" or fc_as_final:
                raise self.unsupported("distilled head after another pooling or fc_norm")
            pool = {"name": "distilled", "params": {"norm": False}}
            dist_head = m.head_dist
            if self.is_id(dist_head) != self.is_id(m.head) or (
                    not self.is_id(dist_head) and (self.linear(dist_head, "head_dist").bias is None
                                                   or dist_head.weight.shape != m.head.weight.shape)):
                raise self.unsupported("distillation head head_dist unlike the class head")
        data["final_norm"] = final or fc_as_final
        data["pool"] = pool
        data["dynamic_img_size"] = bool(m.dynamic_img_size)

        return self.finish(data, blocks)



# --- spec -> timm --------------------------------------------------------------------------------

# timm's VisionTransformer slots: vitlab component -> the timm class that is it (``timm.layers`` or
# ``timm.models.vision_transformer``); any other component has no equivalent unless a plugin
# declares a twin for the slot (``equivalents.SLOTS``). The checks a class needs follow below.
SLOT_CLASSES: dict[str, dict[str, str]] = {
    "attention": {"mhsa": "Attention", "mhsa_subln": "Attention", "mhsa_diff": "DiffAttention"},
    "mlp": {"mlp": "Mlp", "swiglu": "SwiGLU"},
    "block": {"prenorm": "Block", "respostnorm": "ResPostBlock", "parallel": "ParallelScalingBlock",
              "parallel_branches": "ParallelThingsBlock"},
}
# vitlab position encoding -> (timm's ``pos_embed``, its ``no_embed_class`` or None: the spec's)
POS_EMBEDS: dict[str, tuple[str, bool | None]] = {
    "learned": ("learn", None), "none": ("none", False),
    "sincos2d": ("learn", True),  # the fixed table, stored as timm's pos_embed
}
# vitlab pool -> timm's ``global_pool`` (``distilled``: VisionTransformerDistilled's, ``timm_class``)
GLOBAL_POOLS: dict[str, str] = {"token": "token", "none": "", "avg": "avg", "distilled": "token", "map": "map"}


def _slot(kind: str, name: str, fail):
    import timm.layers
    import timm.models.vision_transformer as vit

    if name not in SLOT_CLASSES[kind]:
        raise fail(f"{kind} '{name}'")
    cls = SLOT_CLASSES[kind][name]
    return getattr(timm.layers, cls, None) or getattr(vit, cls)


def vit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of the timm ``VisionTransformer`` (DeiT's distilled one for the pool
    ``distilled``) equivalent to ``spec``: every architectural argument is given, so both the class
    and ``timm.create_model(<any vit_* name>, pretrained=False, **kw)`` build the same model."""
    fail = refuser(spec, "VisionTransformer")
    attn, mlp, block, pool = spec.attention, spec.mlp, spec.block, spec.pool
    pe, pos = spec.patch_embed, spec.pos_embed

    # plugin components with a declared timm twin fill timm's slot (``vitlab_timm_equivalents``)
    twins = {kind: ex.registry.timm_equivalents.get((kind, spec.selection(kind).name)) for kind in SLOTS}
    ap = attn.params
    diff = attn.name == "mhsa_diff"
    if twins["attention"] is not None:
        attn_layer = bound_layer(twins["attention"].layer(ap))
    else:
        attn_layer = _slot("attention", attn.name, fail)
    if diff and ap.get("dual_lambda") and block.name != "parallel":
        raise fail("differential attention with dual_lambda outside a parallel block (timm's VisionTransformer "
                   "builds DiffAttention with its four lambda vectors)")
    if ap.get("kv_heads") not in (None, spec.num_heads):
        raise fail(f"grouped-query attention (kv_heads={ap['kv_heads']}; timm's Attention has a key and value head "
                   "per query head)")
    check_uniform_blocks(spec, fail)
    if twins["mlp"] is not None:
        mlp_layer, act = twins["mlp"].layer(mlp.params), mlp.params.get("act", "gelu")
    else:
        mlp_layer = _slot("mlp", mlp.name, fail)
        act = "silu" if mlp.name == "swiglu" else mlp.params["act"]
    if spec.norm.name not in ("layernorm", "rmsnorm"):
        raise fail(f"norm '{spec.norm.name}'")

    init_values = block.params.get("init_values")
    if twins["block"] is not None:
        block_fn = twins["block"].layer(block.params)
    else:
        block_fn = _slot("block", block.name, fail)
    if twins["block"] is not None:
        pass
    elif block.name == "prenorm" and block.params.get("attn_only_layer_scale"):
        raise fail("layer scale on the attention branch only (timm's Block scales both)")
    elif block.name == "respostnorm" and init_values is not None:
        raise fail("layer scale in a res-post-norm block (timm's ResPostBlock has none)")
    elif block.name == "parallel":
        if not block.params.get("shared_norm", True):
            raise fail("parallel block with separate norms (timm's ParallelScalingBlock shares one)")
        if mlp.name != "mlp" or mlp.params.get("norm"):
            raise fail("parallel block with a gated or normed MLP (ParallelScalingBlock fuses a plain MLP)")
        if diff:  # the differential variant fuses both output projections, as timm always does
            from timm.models.vision_transformer import DiffParallelScalingBlock

            if ap.get("subln"):
                raise fail("parallel block with a normed differential attention (DiffParallelScalingBlock has none)")
            block_fn = DiffParallelScalingBlock
            if ap.get("dual_lambda"):
                block_fn = functools.partial(DiffParallelScalingBlock, dual_lambda=True)
    elif block.name == "parallel_branches" and (n := block.params.get("branches", 2)) != 2:
        block_fn = functools.partial(block_fn, num_parallel=n)
    if block.name != "parallel":
        # timm's Mlp bias follows proj_bias; a bias timm has but vitlab lacks loads as zeros
        if mlp.params.get("bias", True) and not ap.get("proj_bias", True):
            raise fail("MLP bias without attention output bias (timm ties both to proj_bias)")
        if mlp.params.get("out_bias") not in (None, mlp.params.get("bias", True)):
            raise fail("an MLP output bias other than its input bias (timm's Mlp has both or neither; only "
                       "ParallelScalingBlock drops the MLP's output bias)")

    if pe.name not in ("conv", "linear"):
        raise fail(f"patch embedding '{pe.name}'")
    if pe.params.get("stride") not in (None, *spec.patch_hw) or spec.patch_hw[0] != spec.patch_hw[1] and pe.params.get("stride"):
        raise fail(f"patch stride {pe.params['stride']} other than the patch size")
    if pe.params.get("bias", True) and spec.pre_norm:
        raise fail("patch-embedding bias together with pre_norm (timm drops that bias when pre_norm is set)")

    if pos.name not in POS_EMBEDS:
        raise fail(f"position encoding '{pos.name}'")
    if pos.name == "sincos2d" and spec.dynamic_img_size:
        raise fail("sincos2d with dynamic_img_size (timm would resample a fixed table, not recompute it)")
    pos_embed, no_embed_class = POS_EMBEDS[pos.name]
    if no_embed_class is None:
        no_embed_class = not pos.params.get("include_prefix", True)

    if pool.name not in GLOBAL_POOLS:
        raise fail(f"pool '{pool.name}'")
    fc_norm, include_prefix, final_norm = False, False, spec.final_norm
    if pool.name in ("token", "avg") and pool.params.get("norm"):  # timm's fc_norm follows its pooling
        if spec.final_norm:
            raise fail(f"both a final norm and a norm after {'token' if pool.name == 'token' else 'average'} "
                       "pooling (timm has one or the other)")
        fc_norm, final_norm = True, True
    elif pool.name == "distilled":
        if not spec.class_token or spec.reg_tokens != 1 or pool.params.get("norm"):
            raise fail("distilled pool other than class token + one distillation token without a pool norm "
                       "(timm's VisionTransformerDistilled)")
        if not pos.params.get("include_prefix", True) or pos.name != "learned":
            raise fail("distillation token without its position row (VisionTransformerDistilled embeds both tokens)")
    elif pool.name == "map":
        mp = pool.params
        defaults = {"num_heads": None, "mlp_ratio": None, "latent_len": 1, "reduce": "token", "qkv_bias": True,
                    "qk_norm": False, "q_proj": True, "act": act}
        differ = [k for k, v in defaults.items() if mp.get(k, v) != v and not
                  (k == "num_heads" and mp.get(k) == spec.num_heads) and not
                  (k == "mlp_ratio" and mp.get(k) is not None and int(spec.embed_dim * mp[k]) == spec.mlp_hidden_dim)]
        if differ:
            raise fail(f"map pool with {', '.join(f'{k}={mp.get(k)!r}' for k in differ)} (timm builds its attention "
                       "pool with the model's heads, mlp ratio and activation)")
        include_prefix = bool(mp.get("include_prefix", False))

    return dict(
        pos_embed=pos_embed,
        no_embed_class=no_embed_class,
        img_size=pair(spec.img_size),
        patch_size=pair(spec.patch_size),
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
        global_pool=GLOBAL_POOLS[pool.name],
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=ap["qkv_bias"],
        qk_norm=ap["qk_norm"],
        scale_attn_norm=attn.name == "mhsa_subln" or bool(diff and ap.get("subln")),
        scale_mlp_norm=bool(mlp.params.get("norm", False)),
        proj_bias=ap["proj_bias"],
        init_values=init_values if block.name != "respostnorm" else None,
        class_token=spec.class_token,
        reg_tokens=0 if pool.name == "distilled" else spec.reg_tokens,
        pre_norm=spec.pre_norm,
        final_norm=final_norm,
        fc_norm=fc_norm,
        pool_include_prefix=include_prefix,
        dynamic_img_size=spec.dynamic_img_size,
        dynamic_img_pad=bool(pe.params.get("pad", False)),
        drop_rate=spec.drop_rate,
        pos_drop_rate=spec.pos_drop_rate,
        patch_drop_rate=0.0,
        proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=ap.get("attn_drop", 0.0),
        drop_path_rate=spec.drop_path_rate,
        embed_norm_layer=norm_layer(spec, fail) if pe.params.get("norm") else None,
        norm_layer=norm_layer(spec, fail),
        act_layer=act,
        block_fn=block_fn,
        attn_layer=attn_layer,
        mlp_layer=mlp_layer,
    )


def vit_class(spec: ViTSpec, ex: Exporting | None = None) -> type:
    """``VisionTransformer``, or DeiT's ``VisionTransformerDistilled`` for the pool ``distilled``."""
    if spec.pool.name == "distilled":
        from timm.models.deit import VisionTransformerDistilled

        return VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def patchify_state(spec: ViTSpec, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``PatchEmbed``'s weights (vitlab's ``conv`` / ``linear`` embedder), taken out of ``sd``."""
    D = spec.embed_dim
    out: dict[str, torch.Tensor] = {}
    w = sd.pop("patch_embed.proj.weight")
    if w.ndim == 2:  # linear embedder: (D, C * ph * pw) in the conv kernel's order
        w = w.reshape(D, spec.in_chans, *spec.patch_hw)
    out["patch_embed.proj.weight"] = w
    if "patch_embed.proj.bias" in sd:
        out["patch_embed.proj.bias"] = sd.pop("patch_embed.proj.bias")
    elif not spec.pre_norm:  # timm's conv has a bias unless pre_norm
        out["patch_embed.proj.bias"] = w.new_zeros(D)
    for k in [k for k in sd if k.startswith("patch_embed.norm.")]:
        out[k] = sd.pop(k)
    return out


def _parallel_values(spec: ViTSpec, sd: dict[str, torch.Tensor], target) -> None:
    """What ``PARALLEL``'s names cannot say, done in vitlab's names before it is read
    backwards: timm's ParallelScalingBlock has one layer scale (``ls2`` must equal ``ls1``), always
    an MLP input bias and, with ``proj_bias``, an MLP output bias (zeros where vitlab's MLP has none;
    without, vitlab's must be zero), and a fused ``out_proj`` (DiffParallelScalingBlock) one bias."""
    for i in range(spec.depth):
        p = f"blocks.{i}."
        if p + "ls2.gamma" in sd and not torch.equal(sd[p + "ls1.gamma"], sd.pop(p + "ls2.gamma")):
            raise WeightsError(f"{p}ls1.gamma and ls2.gamma differ; timm's ParallelScalingBlock has one layer scale")
        fc1, fc2 = sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc2.weight"]
        sd.setdefault(p + "mlp.fc1.bias", fc1.new_zeros(fc1.shape[0]))
        fc2_bias = sd.pop(p + "mlp.fc2.bias", None)
        if p + "out_proj.bias" in target:  # y = W_a a + W_m m + (b_a + b_m)
            if fc2_bias is not None:
                sd[p + "attn.proj.bias"] = sd[p + "attn.proj.bias"] + fc2_bias
        elif p + "mlp_out_proj.bias" in target:
            sd[p + "mlp.fc2.bias"] = fc2.new_zeros(fc2.shape[0]) if fc2_bias is None else fc2_bias
        elif fc2_bias is not None and torch.count_nonzero(fc2_bias):
            raise WeightsError(f"{p}mlp.fc2.bias is non-zero but timm's ParallelScalingBlock without proj_bias has "
                               "no MLP output bias; no timm equivalent of these weights")


def vit_state_dict(model, ex: Exporting, embed=patchify_state) -> dict[str, torch.Tensor]:
    """A model's weights in the names of timm's ``VisionTransformer``: ``embed(spec, sd)`` takes the
    patch embedding's weights out of ``sd`` in timm's names (a family with another embedder passes
    its own). The names are the tables read backwards into the keys of the timm model (built on the
    meta device), the values what those tables cannot say."""
    spec = model.spec
    cls = ex.timm_class(spec)
    with torch.device("meta"):
        target = cls(**ex.kwargs(spec)).state_dict()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd.update(embed(spec, sd))
    if spec.pos_embed.name == "sincos2d":
        sd["pos_embed.weight"] = model.pos_embed.pe.detach().clone()  # the fixed table, patches only
    if spec.block.name == "parallel":
        _parallel_values(spec, sd, target)
    elif not spec.mlp.params.get("bias", True):  # timm's Mlp biases follow proj_bias: vitlab lacks them, so zeros
        for key in [k for k in target if re.match(r"blocks\.\d+\.(.+\.)?mlp\.fc\w*\.bias$", k) and k not in sd]:
            weight = sd[key[:-len("bias")] + "weight"]
            sd[key] = weight.new_zeros(weight.shape[0])
    if spec.pool.name == "distilled":
        sd = DEIT_DISTILLED.restore(sd, into=target)
    if (plugins := renames(model)) is not None:  # plugin twins' names
        sd = plugins.restore(sd, into=target)
    family = PARALLEL if spec.block.name == "parallel" else Family(cls.__name__, marker=r"(?!)")
    return export_state_dict(sd, family, target)


def _load_parallel(plan) -> None:
    """A checkpoint of timm's ParallelScalingBlock: its names (``PARALLEL``, read forward here so
    that the report keeps timm's), and what they cannot say: its one layer scale serves both
    branches, a fused ``out_proj``'s one bias either branch, and the MLP output bias it may lack
    is zero. Its fused projections are split by the loader (``PARALLEL.split``)."""
    src, tgt = plan.src, plan.target
    blocks = [k[:-len("in_proj.weight")] for k in src.keys() if re.match(r"blocks\.\d+\.in_proj\.weight$", k)]
    for p in blocks:
        if (ls := p + "ls.gamma") in src:
            for tkey in (PARALLEL.to_vitlab(ls), p + "ls2.gamma"):
                if tkey not in tgt:  # shared_layer_scale: ls1 alone
                    continue
                plan.put(tkey, lambda ls=ls: src.get(ls), src.shape(ls), "converted", ls,
                         note="ParallelScalingBlock's one layer scale serves both branches")
        if (bias := p + "out_proj.bias") in src:
            # y = W_a a + W_m m + b: the bias goes to one of the two, the other gets zeros
            dest = PARALLEL.to_vitlab(bias) if PARALLEL.to_vitlab(bias) in tgt else p + "mlp.fc2.bias"
            plan.put(dest, lambda bias=bias: src.get(bias), src.shape(bias), "converted", bias,
                     note="the fused out_proj's bias")
        plan.fallback_zeros.append((p + "mlp.fc2.bias", "the checkpoint's ParallelScalingBlock has no MLP output bias"))
    for skey in src.keys() if blocks else ():
        if skey not in plan.used and (tkey := PARALLEL.to_vitlab(skey)) != skey and plan.free(tkey):
            plan.direct(tkey, skey)


FAMILY = TimmFamily(
    "vision_transformer",
    classes=("timm.models.vision_transformer.VisionTransformer", "timm.models.deit.VisionTransformerDistilled"),
    reader=VitReader,
    claims=lambda spec: True,  # the last family: what no other claims
    timm_class=vit_class, kwargs=vit_kwargs, state_dict=vit_state_dict,
    tables=(DEIT_DISTILLED, PARALLEL),
    load_fixups=_load_parallel,
)
