"""timm's DeepSeek-V4 vision tower (``deepseek_vit``: ``DeepseekVitEncoder`` / ``DeepseekVitClassifier``)
<-> ``ViTSpec``.

A pre-norm ViT with RMSNorm (timm's ``RmsNormFp32``: the same function in float32), fused qkv with
bias, a bias-free packed SwiGLU (``swiglu``; its ``fc1`` is split on load, packed on export), axial
RoPE as the only position encoding (``rope``) and a final norm. The native projector, the aligner,
concatenates 3 x 3 cells in (channel, row, col) order, zero-padding the grid, and maps them through
an MLP (``unshuffle_mlp``); the classifier averages and norms without weights (``avg_std``,
``unshuffle_mlp_avg``). See ``vlm.py`` for what the VLM towers share; the state-dict differences
are ``DEEPSEEK``.
"""
from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ...spec import ViTSpec
from ..bridge import Family, Split, SplitFamily
from ..export import refuser, written_back
from ..family import Exporting, TimmFamily
from ..reader import BlockRead
from .vlm import (
    TOWER, RopeTowerReader, common_kwargs, merge_check, pool_kwargs, require,
)

# timm's DeepSeek tower: the native projector (``aligner``) is vitlab's ``pool``; the packed
# SwiGLU ``mlp.fc1`` is split on load (``SWIGLU_PACKED``), packed on export
DEEPSEEK = Family(
    "deepseek_vit", marker=r"(encoder\.)?aligner\.|encoder\.norm\.weight$",
    renames=(*TOWER, ("encoder.aligner.{rest}", "pool.{rest}"), ("aligner.{rest}", "pool.{rest}"),
             ("encoder.{rest}", "{rest}")),
)

# timm's SwiGLUPacked (``GluMlp``; DeepSeek's tower, Eva without scale_mlp): one ``fc1``, the gate's
# rows first. The loader splits it into a model with vitlab's ``swiglu`` whatever the family
SWIGLU_PACKED = SplitFamily(
    "swiglu_packed", marker=r"(?!)",
    split=(Split("blocks.{block}.mlp.fc1.weight", ("blocks.{block}.mlp.fc1_g.weight", "blocks.{block}.mlp.fc1_x.weight")),
           Split("blocks.{block}.mlp.fc1.bias", ("blocks.{block}.mlp.fc1_g.bias", "blocks.{block}.mlp.fc1_x.bias"))),
    note="split from SwiGLUPacked's fc1 (the gate's rows first)",
)


class DeepseekReader(RopeTowerReader):
    """Reads timm's ``DeepseekVitEncoder`` / ``DeepseekVitClassifier`` (modules and shapes, never names)."""

    projector_attr, order = "aligner", "chw"

    def positions(self, rope: dict) -> dict:
        return {"name": "rope", "params": {**rope, "learned": False}}

    def projector(self) -> dict | None:
        al = self.m.aligner
        return None if al is None else self.unshuffle(al, al.downsample_ratio, None)

    def deepseek_block(self, b: nn.Module, i: int) -> BlockRead:
        """``DeepseekVitBlock``: pre-norm, ``AttentionRope`` and a bias-free packed SwiGLU."""
        from timm.models.deepseek_vit import DeepseekVitBlock

        where = f"blocks.{i}"
        if type(b) is not DeepseekVitBlock:
            raise self.unsupported(f"block type {type(b).__name__} at {where}")
        attn, mlp = self.attention(b.attn, f"{where}.attn"), self.mlp(b.mlp, f"{where}.mlp")
        self.norm(b.norm1, f"{where}.norm1")
        self.norm(b.norm2, f"{where}.norm2")
        return BlockRead(attn, mlp, {"name": "prenorm", "params": {"init_values": None}},
                         float(getattr(b.drop_path1, "drop_prob", 0.0)))

    def spec(self) -> ViTSpec:
        return self.read(self.deepseek_block)


# --- spec -> timm --------------------------------------------------------------------------------

def _align(spec: ViTSpec, fail, p: dict) -> dict:
    k = merge_check(spec, fail, p, "chw", pad=True)
    if p["norm"] or not p.get("out_features") or p.get("hidden") != p["out_features"]:
        raise fail("aligner with a norm, or with fc1 and fc2 of different widths (DeepSeek's: both out_features)")
    return {"downsample_ratio": k, "out_features": p["out_features"]}


def deepseek_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``DeepseekVitClassifier`` for ``spec``."""
    fail = refuser(spec, "DeepseekVitClassifier")
    require(spec, ex, fail, {
        "patch_embed": ("conv", {"bias": True}),
        "pos_embed": ("rope", {"rotate_half": True}),
        "attention": ("mhsa", {"qkv_bias": True, "proj_bias": True}),
        "mlp": ("swiglu", {"bias": False}),
        "norm": ("rmsnorm", {}),
        "block": ("prenorm", {}),
    }, free={"patch_embed": ("pad",), "pos_embed": ("temperature",), "attention": ("attn_drop",),
             "norm": ("eps",)})
    if not spec.final_norm:
        raise fail("no final norm (DeepSeek's encoder ends with one)")
    eps = spec.norm.params["eps"]
    pool = pool_kwargs(spec, fail, "align", eps, "rmsnorm", functools.partial(_align, spec, fail))
    return dict(common_kwargs(spec), mlp_ratio=spec.mlp_ratio, norm_eps=eps,
                rope_temperature=spec.pos_embed.params["temperature"],
                dynamic_img_pad=spec.patch_embed.params["pad"], **pool)


def _claims(spec: ViTSpec) -> bool:
    """RoPE with the VLM pools or with a bias-free SwiGLU and RMSNorm (which timm's Eva cannot hold)."""
    if spec.pos_embed.name != "rope":
        return False
    bias_free_swiglu = spec.mlp.name == "swiglu" and not spec.mlp.params["bias"] and spec.norm.name == "rmsnorm"
    return bias_free_swiglu or spec.pool.name in ("avg_std", "unshuffle_mlp", "unshuffle_mlp_avg")


FAMILY = TimmFamily(
    "deepseek_vit", reader=DeepseekReader,
    classes=("timm.models.deepseek_vit.DeepseekVitClassifier", "timm.models.deepseek_vit.DeepseekVitEncoder"),
    claims=_claims, timm_class="timm.models.deepseek_vit.DeepseekVitClassifier", kwargs=deepseek_kwargs,
    # GluMlp's one fc1, the gate's rows first
    state_dict=functools.partial(written_back, table=DEEPSEEK, prepare=SWIGLU_PACKED.restore),
    tables=(DEEPSEEK, SWIGLU_PACKED),
)
