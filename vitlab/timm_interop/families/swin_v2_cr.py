"""timm's ``SwinTransformerV2Cr`` (Christoph Reich's Swin v2; ``swin_transformer_v2_cr``) <-> a staged vitlab spec.

Swin v2's layout as ``swin_v2`` reads it, with v2-cr's own pieces: window attention with a qkv
bias and the ``cpb_cr`` position bias (a meta MLP over log-spaced (query, key) pairs), v1's patch
merging (norm, then reduction), and no final norm: the last block of the model, and of every
stage with ``extra_norm_stage``, and every ``extra_norm_period``-th block of a stage, norm the
residual stream after themselves (``respostnorm_norm3``, written as ``layers``). timm keeps the
logit scale as (heads,), vitlab as (heads, 1, 1): reshaped on load and on export.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..bridge import Family
from ..export import refuser
from ..family import Exporting, TimmFamily
from ..reader import fmt_float
from ..staged import staged_state_dict
from .swin import stage_windows
from .swin_v2 import SwinV2Reader, common_kwargs

SWIN_V2_CR = Family(
    "swin_v2_cr", marker=r"stages\.\d+\.blocks\.\d+\.attn\.meta_mlp\.",
    renames=(("stages.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
             ("stages.{stage}.downsample.{rest}", "transitions.{stage}.{rest}"),
             ("head.fc.{rest}", "head.{rest}")),
)

FIXED: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {"act": "gelu", "bias": True, "norm": False}),
    "pos_embed": ("none", {}),
    "pool": ("avg", {"norm": False}),
}
NORM3 = "respostnorm_norm3"


def extra_norms(depths: list[int], period: int, stage: bool) -> list[bool]:
    """Which blocks timm gives a ``norm3``: every ``period``-th of a stage, the last of every stage
    with ``stage``, and the model's last (timm's ``_extra_norm``)."""
    out = []
    for s, depth in enumerate(depths):
        ends = stage or s == len(depths) - 1
        out += [bool(period and (j + 1) % period == 0) or (ends and j + 1 == depth) for j in range(depth)]
    return out


class SwinV2CrReader(SwinV2Reader):
    """Reads a timm ``SwinTransformerV2Cr`` instance (its modules and shapes, never its name)."""

    timm_module = "timm.models.swin_transformer_v2_cr"
    model_cls, stage_cls, block_cls = "SwinTransformerV2Cr", "SwinTransformerV2CrStage", "SwinTransformerV2CrBlock"
    attn_cls = "WindowMultiHeadAttention"
    stages_attr, grid_attr = "stages", "feat_size"
    merge = {"name": "patch_merge"}

    def embed(self) -> tuple[dict, int]:
        pe = self.m.patch_embed
        conv, ps = pe.proj, tuple(pe.patch_size)
        if not self.is_timm(pe, "PatchEmbed") or type(conv) is not nn.Conv2d:
            raise self.unsupported(f"patch embedding {type(pe).__name__}")
        if (tuple(conv.kernel_size) != ps or tuple(conv.stride) != ps or tuple(conv.padding) != (0, 0)
                or conv.groups != 1 or conv.bias is None or ps[0] != ps[1]):
            raise self.unsupported("patch projection other than a square conv with bias, kernel = stride = patch size")
        h, w = pe.img_size
        if h % ps[0] or w % ps[1]:
            raise self.unsupported(f"image size {h}x{w} not divisible by patch size {ps[0]}")
        if self.is_id(pe.norm):
            raise self.unsupported("patch embedding without its norm")
        self.norm(pe.norm, "patch_embed.norm")
        return {"img_size": [int(h), int(w)] if h != w else int(h), "patch_size": int(ps[0]),
                "in_chans": conv.in_channels, "patch_embed": {"name": "conv", "params": {"norm": True}}
                }, conv.out_channels

    def final_norm(self) -> bool:
        return False  # the last block's norm3

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.layers import Mlp

        qkv, proj = self.window(a, where, dim)
        meta = a.meta_mlp
        if (type(meta) is not Mlp or type(meta.act) is not nn.ReLU or not self.is_id(meta.norm) or meta.drop2.p
                or self.linear(meta.fc1, f"{where}.meta_mlp.fc1").bias is None
                or self.linear(meta.fc2, f"{where}.meta_mlp.fc2").bias is None):
            raise self.unsupported(f"position bias MLP other than fc1, ReLU, dropout, fc2 with biases at {where}")
        return {"heads": a.num_heads, "proj_drop": a.proj_drop.p, "name": "window",
                "params": {"qkv_bias": qkv.bias is not None, "proj_bias": proj.bias is not None,
                           "attn_drop": fmt_float(a.attn_drop.p), "rel_pos": "cpb_cr", "cosine": True,
                           "window_size": self.square(a.window_size, "windows", where),
                           "cpb_hidden": meta.fc1.out_features, "cpb_drop": fmt_float(meta.drop1.p)}}

    def block_kind(self, b: nn.Module, where: str) -> dict:
        norm3 = not self.is_id(b.norm3)
        if norm3:
            self.norm(b.norm3, f"{where}.norm3")
        return {"name": NORM3 if norm3 else "respostnorm", "params": {"init_values": None}}


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec) -> bool:
    return spec.stages is not None and any(p.selections["attention"].params.get("rel_pos") == "cpb_cr"
                                           for p in spec.block_plans())


def swin_v2_cr_kwargs(spec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``SwinTransformerV2Cr`` (any ``swinv2_cr_*`` name)."""
    fail = refuser(spec, "SwinTransformerV2Cr")
    if spec.final_norm:
        raise fail("a final norm (v2-cr norms in its last block instead: respostnorm_norm3)")
    if any(p.transition.name != "patch_merge" or p.transition.params.get("norm_last") for p in spec.stage_plans()[1:]):
        raise fail("stage transitions other than patch_merge without norm_last")
    windows, _, _, ap = stage_windows(spec, ex, fail, "Swin v2", FIXED, "cpb_cr", True, ("mlp", "norm"), True)
    if ap["qkv_bias"] is not True or ap["cpb_hidden"] != 384 or ap["cpb_drop"] != 0.125:
        raise fail("attention without a full qkv bias, or a bias MLP other than 384 wide with dropout 0.125")
    blocks = [p.selections["block"] for p in spec.block_plans()]
    if any(b.name not in ("respostnorm", NORM3) or b.params.get("init_values") is not None for b in blocks):
        raise fail("blocks other than respostnorm / respostnorm_norm3 without layer scale")
    depths = [st.depth for st in spec.stages]
    has = [b.name == NORM3 for b in blocks]
    found = next(((period, stage) for stage in (False, True) for period in range(max(depths) + 1)
                  if extra_norms(depths, period, stage) == has), None)
    if found is None:
        raise fail("blocks with norm3 other than every N-th of a stage and the last of a stage or of the model")
    return dict(common_kwargs(spec, windows, fail), attn_drop_rate=ap.get("attn_drop", 0.0),
                extra_norm_period=found[0], extra_norm_stage=found[1])


def _flat_logit_scales(sd: dict) -> dict:
    """The logit scales (heads,) again, as timm keeps them."""
    return {k: v.flatten() if k.endswith("attn.logit_scale") else v for k, v in sd.items()}


def _load_logit_scales(plan) -> None:
    """A checkpoint's logit scales of (heads,) into vitlab's (heads, 1, 1) (v2-cr's; nothing else
    stores a ``attn.logit_scale`` of that shape for a window attention's)."""
    src, tgt = plan.src, plan.target
    for skey in src.keys():
        if (skey.endswith("attn.logit_scale") and plan.free(skey) and len(src.shape(skey)) == 1
                and tuple(tgt[skey].shape) == (*src.shape(skey), 1, 1)):
            plan.put(skey, lambda skey=skey: src.get(skey).reshape(-1, 1, 1), tuple(tgt[skey].shape), "converted",
                     skey, note="logit scale (heads,) as (heads, 1, 1)")


FAMILY = TimmFamily(
    "swin_transformer_v2_cr", classes=("timm.models.swin_transformer_v2_cr.SwinTransformerV2Cr",),
    reader=SwinV2CrReader, claims=_claims, timm_class="timm.models.swin_transformer_v2_cr.SwinTransformerV2Cr",
    kwargs=swin_v2_cr_kwargs, state_dict=staged_state_dict(SWIN_V2_CR, swin_v2_cr_kwargs, _flat_logit_scales),
    tables=(SWIN_V2_CR,), load_fixups=_load_logit_scales,
)
