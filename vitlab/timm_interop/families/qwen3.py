"""timm's Qwen3-VL / Qwen3.5 vision tower (``qwen3_vit``: ``Qwen3VitEncoder`` / ``Qwen3VitClassifier``)
<-> ``ViTSpec``.

A plain pre-norm ViT without final norm (timm's ``PatchEmbed`` and ``EvaBlock``: LayerNorm, fused
qkv with bias, GELU-tanh MLP) whose position encoding is axial RoPE plus a learned 48 x 48 table
resampled bilinearly to every grid (``rope_table``). The native projector, the merger, norms each
token, concatenates 2 x 2 cells in (row, col, channel) order and maps them through an MLP
(``unshuffle_mlp``); the classifier averages and norms without weights (``avg_std``,
``unshuffle_mlp_avg``). See ``vlm.py`` for what the VLM towers share; the state-dict differences
are ``QWEN3``.
"""
from __future__ import annotations

import functools
from typing import Any

from ...spec import ViTSpec
from ..bridge import Family
from ..export import refuser, written_back
from ..family import Exporting, TimmFamily
from .vlm import (
    TOWER, RopeTowerReader, common_kwargs, merge_check, pool_kwargs, require,
)

# timm's Qwen3-VL tower: the native projector (``merger``) is vitlab's ``pool``
QWEN3 = Family(
    "qwen3_vit", marker=r"(encoder\.)?merger\.|encoder\.pos_embed$",
    renames=(*TOWER, ("encoder.merger.{rest}", "pool.{rest}"), ("merger.{rest}", "pool.{rest}"),
             ("encoder.pos_embed", "pos_embed.weight"), ("pos_embed", "pos_embed.weight"),
             ("encoder.{rest}", "{rest}")),
)


class QwenReader(RopeTowerReader):
    """Reads timm's ``Qwen3VitEncoder`` / ``Qwen3VitClassifier`` (modules and shapes, never names)."""

    projector_attr, order = "merger", "hwc"

    def positions(self, rope: dict) -> dict:
        m = self.m
        G = m.pos_embed_grid_size
        if tuple(m.pos_embed.shape) != (1, G * G, m.embed_dim):
            raise self.unsupported(f"position table of shape {tuple(m.pos_embed.shape)}")
        if rope["variant"] != "axial" or rope["grid_offset"] or rope["ref_grid"] is not None:
            raise self.unsupported("RoPE with an offset or reference grid")
        params = {"temperature": rope["temperature"], "rotate_half": rope["rotate_half"],
                  "grid_indexing": rope["grid_indexing"], "table_grid": [G, G]}
        return {"name": "rope_table", "params": params}

    def projector(self) -> dict | None:
        mg = self.m.merger
        return None if mg is None else self.unshuffle(mg, mg.merge_size, mg.norm)

    def spec(self) -> ViTSpec:
        return self.read(self.block)


# --- spec -> timm --------------------------------------------------------------------------------

def _merge(spec: ViTSpec, fail, p: dict) -> dict:
    k = merge_check(spec, fail, p, "hwc", pad=False)
    if not p["norm"] or p.get("hidden") not in (None, k * k * spec.embed_dim):
        raise fail("merger without its norm or with fc1 of another width (Qwen's: k * k * embed_dim, normed)")
    return {"merge_size": k, "out_features": p.get("out_features") or 0}


def qwen_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Qwen3VitClassifier`` for ``spec``."""
    from timm.layers import get_act_layer

    fail = refuser(spec, "Qwen3VitClassifier")
    require(spec, ex, fail, {
        "patch_embed": ("conv", {"bias": True}),
        "pos_embed": ("rope_table", {"rotate_half": True, "grid_indexing": "ij"}),
        "attention": ("mhsa", {"qkv_bias": True, "proj_bias": True}),
        "mlp": ("mlp", {"bias": True}),
        "norm": ("layernorm", {"bias": True}),
        "block": ("prenorm", {}),
    }, free={"pos_embed": ("temperature", "table_grid"), "attention": ("attn_drop",), "mlp": ("act",),
             "norm": ("eps",)})
    if spec.final_norm:
        raise fail("a final norm (Qwen's encoder has none)")
    grid = spec.pos_embed.params["table_grid"] or list(spec.build_context().grid_size)
    if grid[0] != grid[1]:
        raise fail(f"a {grid[0]}x{grid[1]} position table (Qwen's is square)")
    eps = spec.norm.params["eps"]
    pool = pool_kwargs(spec, fail, "merge", eps, "layernorm", functools.partial(_merge, spec, fail))
    return dict(common_kwargs(spec), mlp_ratio=spec.mlp_ratio, pos_embed_grid_size=grid[0], norm_eps=eps,
                rope_temperature=spec.pos_embed.params["temperature"],
                act_layer=get_act_layer(spec.mlp.params["act"]), **pool)


FAMILY = TimmFamily(
    "qwen3_vit", reader=QwenReader,
    classes=("timm.models.qwen3_vit.Qwen3VitClassifier", "timm.models.qwen3_vit.Qwen3VitEncoder"),
    claims=lambda spec: spec.pos_embed.name == "rope_table",
    timm_class="timm.models.qwen3_vit.Qwen3VitClassifier", kwargs=qwen_kwargs,
    state_dict=functools.partial(written_back, table=QWEN3), tables=(QWEN3,),
)
