"""timm's ``Nest`` (NesT, Zhang et al. 2021; ``nest``) <-> a staged vitlab spec.

NesT is a vitlab model with ``stages`` (timm's levels): a ``conv`` patch embedding without a norm, a
``learned`` position table, no prefix tokens, blocks that attend within the blocks of the grid
(``window``, no shift, no bias, the window the block: the same side at every level, the grid halving
until the last level is one block), and a ``conv_pool`` transition into every later level (timm's
``ConvPool``, with that level's own position table: ``pos_embed: true``). The final norm over every
token and an ``adaptive_avg`` pool feed the classifier.

The state-dict differences are the ``NEST`` table: timm keeps blocks per level
(``levels.{stage}.transformer_encoder.{j}``), the aggregation in the level it leads into
(``levels.{stage}.pool``), and each level's position table blockified, (1, blocks, tokens per
block, D), where vitlab's is (1, tokens, D) in raster order: reordered on load and on export.
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
from ..export import norm_layer, refuser, require
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, Reader, common_and_layers, fmt_float
from .swin import at_text


def deblockify(t: torch.Tensor) -> torch.Tensor:
    """timm's table (1, blocks, tokens per block, D), both square -> (1, tokens, D) in raster order."""
    _, T, n, D = t.shape
    g, b = math.isqrt(T), math.isqrt(n)
    t = t.reshape(1, g, g, b, b, D).transpose(2, 3)  # (1, block row, row in block, block col, col in block, D)
    return t.reshape(1, T * n, D)


def blockify(t: torch.Tensor, block: int) -> torch.Tensor:
    """(1, tokens, D) on a square grid in raster order -> timm's (1, blocks, block², D)."""
    _, N, D = t.shape
    g = math.isqrt(N) // block
    t = t.reshape(1, g, block, g, block, D).transpose(2, 3)  # (1, block row, block col, row, col, D)
    return t.reshape(1, g * g, block * block, D)


def _is_table(key: str) -> bool:
    return key == "pos_embed.weight" or (key.startswith("transitions.") and key.endswith(".pos_embed.weight"))


def heads_last(w: torch.Tensor, heads: int) -> torch.Tensor:
    """An output projection's weight (D, heads * hd) whose inputs are vitlab's (head, channel) ->
    timm NesT's (channel, head): its attention merges the heads as (B, T, N, hd, heads)."""
    return w.reshape(w.shape[0], heads, -1).transpose(1, 2).reshape(w.shape[0], -1)


def heads_first(w: torch.Tensor, heads: int) -> torch.Tensor:
    """``heads_last`` inverted: timm NesT's (channel, head) inputs -> vitlab's (head, channel)."""
    return w.reshape(w.shape[0], -1, heads).transpose(1, 2).reshape(w.shape[0], -1)


_PROJ = re.compile(r"blocks\.(\d+)\.attn\.proj\.weight$")
HEADS_LAST = "inputs (head_dim, heads) as timm's NesT merges its heads -> (heads, head_dim)"


@dataclass(frozen=True)
class BlockedTables(Family):
    """A family whose position tables are stored blockified (1, blocks, tokens per block, D): seen
    as vitlab's (1, tokens, D) on load (``restore`` takes them already blockified)."""

    def adapt(self, src, depths: Sequence[int] | None = None):
        out = super().adapt(src, depths)
        tables = [k for k in out.keys() if _is_table(k) and len(out.shape(k)) == 4]
        shapes = {k: ((1, s[1] * s[2], s[3]) if k in tables else s) for k, s in out.shapes.items()
                  for s in [tuple(s)]}
        note = "blockified (1, blocks, tokens per block, D) -> raster rows"
        # the output projections' inputs are reordered by ``_load_projections``, which knows the heads
        notes = {**{k: note for k in tables}, **{k: HEADS_LAST for k in out.keys() if _PROJ.match(k)}}
        return out.replaced(shapes, lambda k: deblockify(out.get(k)) if k in tables else out.get(k),
                            converted={**out.converted, **notes})


NEST = BlockedTables(
    "nest", marker=r"levels\.\d+\.transformer_encoder\.\d+\.",
    renames=(("levels.0.pos_embed", "pos_embed.weight"),
             ("levels.{stage}.pos_embed", "transitions.{stage}.pos_embed.weight"),
             ("levels.{stage}.pool.{rest}", "transitions.{stage}.{rest}"),
             ("levels.{stage}.transformer_encoder.{j}.{rest}", "blocks.{block}.{rest}")),
)

# what every NesT block and the model around them are apart from widths: kind -> (component, params)
_FIXED: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {"act": "gelu", "bias": True, "norm": False}),
    "block": ("prenorm", {"init_values": None}),
    "pos_embed": ("learned", {}),
    "pool": ("adaptive_avg", {}),
    "patch_embed": ("conv", {}),
}


# --- timm -> spec ------------------------------------------------------------------------------------

class NestReader(Reader):
    """Reads a timm ``Nest`` instance (its modules and shapes, never its name)."""

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.models.nest import Attention

        if type(a) is not Attention:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if qkv.out_features != 3 * dim or proj.in_features != dim or dim % a.num_heads:
            raise self.unsupported(f"attention width other than the level's {dim} at {where}")
        return {"heads": a.num_heads, "proj_drop": a.proj_drop.p, "name": "window",
                "params": {"qkv_bias": qkv.bias is not None, "proj_bias": proj.bias is not None,
                           "attn_drop": fmt_float(a.attn_drop.p)}}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        from timm.models.nest import TransformerLayer

        attn, mlp = self.parts(b, where, types=(TransformerLayer,), dim=dim)
        return BlockRead(attn, mlp, {"name": "prenorm", "params": {"init_values": None}},
                         float(getattr(b.drop_path1, "drop_prob", 0.0)))

    def aggregation(self, pool: nn.Module, s: int, in_dim: int) -> tuple[int, dict]:
        """timm's ``ConvPool`` into level ``s``: its width out and the ``conv_pool`` selection."""
        from timm.layers.pool2d_same import MaxPool2dSame
        from timm.models.nest import ConvPool

        where = f"levels.{s}.pool"
        if type(pool) is not ConvPool or type(pool.conv) is not nn.Conv2d:
            raise self.unsupported(f"block aggregation {type(pool).__name__} at {where}")
        c = pool.conv
        if (tuple(c.kernel_size), tuple(c.stride), tuple(c.padding), tuple(c.dilation), c.groups) != (
                (3, 3), (1, 1), (1, 1), (1, 1), 1) or c.bias is None or c.in_channels != in_dim:
            raise self.unsupported(f"aggregation convolution other than 3x3, padding 1, with bias at {where}.conv")
        self.norm(pool.norm, f"{where}.norm")
        p = pool.pool
        geometry = (p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode)
        if type(p) is nn.MaxPool2d and geometry == (3, 2, 1, 1, False):
            padding = "symmetric"
        elif type(p) is MaxPool2dSame and geometry == ((3, 3), (2, 2), (0, 0), (1, 1), False):
            padding = "same"
        else:
            raise self.unsupported(f"aggregation pool {type(p).__name__} {geometry} at {where}.pool")
        return c.out_channels, {"name": "conv_pool", "params": {"padding": padding, "pos_embed": True}}

    def embedding(self) -> dict:
        from timm.layers import PatchEmbed

        pe = self.m.patch_embed
        conv = pe.proj
        if type(pe) is not PatchEmbed or type(conv) is not nn.Conv2d or not self.is_id(pe.norm):
            raise self.unsupported(f"patch embedding {type(pe).__name__} other than a conv without a norm")
        ps = tuple(pe.patch_size)
        if (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding)) != (ps, ps, (0, 0)) or conv.groups != 1:
            raise self.unsupported("patch projection other than a conv with kernel = stride = patch size")
        h, w = pe.img_size
        return {"img_size": int(h), "patch_size": int(ps[0]), "in_chans": conv.in_channels,
                "patch_embed": {"name": "conv", "params": {"bias": conv.bias is not None}}}

    def spec(self) -> ViTSpec:
        from timm.models.nest import Nest, NestLevel

        m = self.m
        if type(m) is not Nest:
            raise self.unsupported(f"Nest subclass {type(m).__name__}")
        data: dict[str, Any] = {"name": self.name, **self.embedding(), "class_token": False, "reg_tokens": 0,
                                "pos_embed": {"name": "learned"}, "pre_norm": False}
        width, stages, blocks, transitions = m.patch_embed.proj.out_channels, [], [], []
        for s, level in enumerate(m.levels):
            where = f"levels.{s}"
            if type(level) is not NestLevel or not len(level.transformer_encoder):
                raise self.unsupported(f"level {type(level).__name__} without blocks at {where}")
            stage: dict[str, Any] = {}
            if s == 0:
                if not self.is_id(level.pool):
                    raise self.unsupported("block aggregation before the first level")
            else:
                width, sel = self.aggregation(level.pool, s, width)
                transitions.append(sel)
            _, T, n, D = level.pos_embed.shape
            if D != width or n != level.block_size ** 2 or math.isqrt(T) ** 2 != T:
                raise self.unsupported(f"position table {tuple(level.pos_embed.shape)} at {where}.pos_embed")
            read = [self.block(b, len(blocks) + j, width, f"{where}.transformer_encoder.{j}")
                    for j, b in enumerate(level.transformer_encoder)]
            for r in read:
                r.attn["params"]["window_size"] = int(level.block_size)
            stages.append({"depth": len(read), "embed_dim": width, "num_heads": read[0].attn["heads"], **stage})
            blocks += [(b, width, f"{where}.transformer_encoder.{j}") for j, b in enumerate(read)]
        if len(stages) < 2:
            raise self.unsupported("a single level (no block aggregation)")
        if any(t != transitions[0] for t in transitions):
            raise self.unsupported("block aggregations that differ in padding")
        data["transition"] = transitions[0]
        first = blocks[0][0]
        for b, _, where in blocks:
            if b.settings(attn=("heads", "params"), mlp=("hidden",)) != first.settings(attn=("heads", "params"),
                                                                                    mlp=("hidden",)):
                raise self.unsupported(f"blocks that differ other than in width ({where})")
        data["attention"], layers = common_and_layers([{"name": "window", "params": b.attn["params"]}
                                                       for b, _, _ in blocks], "attention", at_text)
        ratios = [self.mlp_ratio(b.mlp["hidden"], f"{where}.mlp", w) for b, w, where in blocks]
        data["mlp_ratio"], ratio_layers = common_and_layers(ratios, "mlp_ratio", at_text)
        data.update(stages=stages, layers=layers + ratio_layers, final_norm=not self.is_id(m.norm),
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]}, block=first.block)
        if data["final_norm"]:
            self.norm(m.norm, "norm")
        data.update(self.head(width))
        data["norm"] = self.norm_selection()
        data["proj_drop_rate"] = fmt_float(first.attn["proj_drop"])
        data["drop_path_rate"] = fmt_float(blocks[-1][0].drop_path) if len(blocks) > 1 else 0.0
        return self.validated(data)

    def head(self, width: int) -> dict:
        m = self.m
        if m.global_pool.pool_type != "avg" or m.global_pool.is_identity():
            raise self.unsupported(f"global_pool '{m.global_pool.pool_type}' (NesT: avg)")
        return {"pool": {"name": "adaptive_avg"}, "num_classes": self.num_classes(width),
                "drop_rate": fmt_float(m.head_drop.p)}


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return spec.stages is not None and all(p.transition.name == "conv_pool" for p in spec.stage_plans()[1:])


def nest_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Nest`` (any ``nest_*`` name) for a staged spec."""
    fail = refuser(spec, "Nest")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or not spec.final_norm or spec.dynamic_img_size:
        raise fail("prefix tokens, pre_norm, dynamic_img_size or no final norm (NesT: none, none, no, a final norm)")
    h, w = spec.img_hw
    if h != w or spec.patch_hw[0] != spec.patch_hw[1]:
        raise fail("a non-square image or patch (NesT's grid is square)")
    pe = spec.patch_embed.params
    if pe.get("norm") or not pe.get("bias", True) or pe.get("pad") or pe.get("stride") not in (None, spec.patch_hw[0]):
        raise fail(f"patch embedding {pe} (NesT: a conv with bias, kernel = stride = patch size, no norm)")
    require(spec, ex.registry, fail, _FIXED, {}, "NesT")
    plans, stages = spec.block_plans(), spec.stage_plans()
    if any(p.transition.params.get("pos_embed") is not True for p in stages[1:]) or len(
            {p.transition.params.get("padding", "symmetric") for p in stages[1:]}) != 1:
        raise fail("an aggregation without its level's position table, or paddings that differ (NesT: one padding, "
                   "pos_embed: true)")
    sels = [p.selections["attention"] for p in plans]
    if any(s.name != "window" or s.params.get("rel_pos", "none") != "none" or shifted(s.params.get("shift", 0))
           for s in sels):
        raise fail("attention other than window without shift or position bias")
    if len({tuple(sorted(s.params.items())) for s in sels}) != 1 or len({p.mlp_ratio for p in plans}) != 1:
        raise fail("attention params or MLP ratios that differ between blocks")
    if any(p.selections[k] != spec.selection(k) for p in plans for k in ("mlp", "norm", "block")):
        raise fail("per-block overrides other than attention")
    grid, levels, window = spec.stage_contexts(ex.registry, device="meta")[0].grid_size, len(stages), \
        sels[0].params["window_size"]
    if grid[0] != window * 2 ** (levels - 1):
        raise fail(f"window {window} on a {grid[0]}x{grid[1]} grid with {levels} levels (NesT: the first level's "
                   f"grid is 2^(levels - 1) windows a side)")
    ap = sels[0].params
    if ap.get("kv_heads") is not None or ap.get("qk_norm") or not ap.get("proj_bias", True):
        raise fail("attention with kv_heads, qk_norm or without output bias")
    return dict(
        img_size=h, patch_size=spec.patch_hw[0], in_chans=spec.in_chans, num_levels=levels,
        embed_dims=tuple(st.embed_dim for st in stages), num_heads=tuple(st.num_heads for st in stages),
        depths=tuple(st.depth for st in stages), num_classes=spec.num_classes, mlp_ratio=plans[0].mlp_ratio,
        qkv_bias=ap.get("qkv_bias", True), drop_rate=spec.drop_rate, proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=ap.get("attn_drop", 0.0), drop_path_rate=spec.drop_path_rate,
        norm_layer=norm_layer(spec, fail), pad_type="same" if stages[1].transition.params.get("padding") == "same" else "",
    )


def shifted(shift) -> bool:
    """Whether a ``window`` shift (an int or [h, w]) is not zero."""
    return any(shift) if isinstance(shift, (list, tuple)) else bool(shift)


def nest_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A staged vitlab NesT's weights in timm's names (``NEST`` read backwards, tables blockified)."""
    spec = model.spec
    nest_kwargs(spec, ex)
    window = spec.block_plans()[0].selections["attention"].params["window_size"]
    sd = {k: (blockify(v, window) if _is_table(k) else v).detach() for k, v in model.state_dict().items()}
    for k in [k for k in sd if _PROJ.match(k)]:
        sd[k] = heads_last(sd[k], model.blocks[int(_PROJ.match(k).group(1))].attn.num_heads)
    return NEST.restore(sd, depths=[p.depth for p in spec.stage_plans()])


def _load_projections(plan) -> None:
    """A NesT checkpoint's attention output projections (marked ``HEADS_LAST`` by ``NEST.adapt``)
    with their inputs in vitlab's (head, channel) order."""
    src = plan.src
    for skey in src.keys():
        if (m := _PROJ.match(skey)) and src.converted.get(skey) == HEADS_LAST and plan.free(skey):
            b = int(m.group(1))
            heads = getattr(plan.model.blocks[b].attn, "num_heads", None) if b < len(plan.model.blocks) else None
            if heads is None:  # not a heads-based attention: left to the generic rules (a shape or load problem)
                continue
            plan.put(skey, lambda skey=skey, heads=heads: heads_first(src.get(skey), heads), src.shape(skey),
                     "converted", skey, note=HEADS_LAST)


FAMILY = TimmFamily(
    "nest", classes=("timm.models.nest.Nest",), reader=NestReader, claims=_claims,
    timm_class="timm.models.nest.Nest", kwargs=nest_kwargs, state_dict=nest_state_dict, tables=(NEST,),
    load_fixups=_load_projections,
)
