"""timm's ``SwinTransformerV2`` (Swin v2, Liu et al. 2022; ``swin_transformer_v2``) <-> a staged vitlab spec.

Swin v2 is Swin v1's layout (``swin``: four stages, shifted windows on the odd blocks of a stage,
patch merging into every stage after the first) with three changes, all params of components:
blocks are res-post-norm (``respostnorm``: x + norm(attn(x))), window attention is cosine with a
learned logit scale and a continuous position bias (``window`` with ``rel_pos: cpb``, ``cosine``,
``qkv_bias: qv`` and its ``pretrained_window_size``), and patch merging norms after the reduction
(``patch_merge`` with ``norm_last``). The state dict is v1's (``SWIN``) but for the q / v biases,
which vitlab keeps inside ``attn.qkv``. The reader is v1's (``SwinReader``) with v2's classes.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import refuser
from ..family import Exporting, TimmFamily
from ..reader import fmt_float
from ..staged import staged_state_dict
from .swin import SwinReader, stage_windows, swin_args

SWIN_V2 = Family(
    "swin_v2", marker=r"layers\.\d+\.blocks\.\d+\.attn\.(cpb_mlp|logit_scale)",
    renames=(("layers.{stage}.blocks.{j}.attn.q_bias", "blocks.{block}.attn.qkv.q_bias"),
             ("layers.{stage}.blocks.{j}.attn.v_bias", "blocks.{block}.attn.qkv.v_bias"),
             ("layers.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
             ("layers.{stage}.downsample.{rest}", "transitions.{stage}.{rest}"),
             ("head.fc.{rest}", "head.{rest}")),
)

# what every v2 block is apart from its window, shift and width: kind -> (component, params)
FIXED: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {"act": "gelu", "bias": True, "norm": False}),
    "block": ("respostnorm", {"init_values": None}),
    "pos_embed": ("none", {}),
    "pool": ("avg", {"norm": False}),
}


# --- timm -> spec ------------------------------------------------------------------------------------

class SwinV2Reader(SwinReader):
    """Reads a timm ``SwinTransformerV2`` instance (its modules and shapes, never its name)."""

    timm_module = "timm.models.swin_transformer_v2"
    model_cls, stage_cls, block_cls = "SwinTransformerV2", "SwinTransformerV2Stage", "SwinTransformerV2Block"
    merge = {"name": "patch_merge", "params": {"norm_last": True}}

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        qkv, proj = self.window(a, where, dim)
        if qkv.bias is not None:
            raise self.unsupported(f"a qkv bias at {where}")
        mlp = a.cpb_mlp
        if (not isinstance(mlp, nn.Sequential) or len(mlp) != 3 or type(mlp[1]) is not nn.ReLU
                or self.linear(mlp[0], f"{where}.cpb_mlp.0").bias is None
                or self.linear(mlp[2], f"{where}.cpb_mlp.2").bias is not None or mlp[0].in_features != 2):
            raise self.unsupported(f"position bias MLP other than Linear(2, h), ReLU, Linear(h, heads) at {where}")
        return {"heads": a.num_heads, "proj_drop": a.proj_drop.p, "name": "window",
                "params": {"qkv_bias": "qv" if a.q_bias is not None else False, "proj_bias": proj.bias is not None,
                           "attn_drop": fmt_float(a.attn_drop.p), "rel_pos": "cpb", "cosine": True,
                           "window_size": self.square(a.window_size, "windows", where),
                           "pretrained_window_size": self.square(a.pretrained_window_size, "pretrained windows",
                                                                 where),
                           "cpb_hidden": mlp[0].out_features}}

    def block_kind(self, b: nn.Module, where: str) -> dict:
        return {"name": "respostnorm", "params": {"init_values": None}}


# --- spec -> timm -----------------------------------------------------------------------------------

def common_kwargs(spec: ViTSpec, windows: list, fail) -> dict[str, Any]:
    """The arguments both Swin v2 classes take alike (square patches and windows, one MLP ratio)."""
    if len(set(spec.patch_hw)) != 1:
        raise fail(f"{spec.patch_hw[0]}x{spec.patch_hw[1]} patches (Swin v2: square)")
    return swin_args(spec, fail, spec.patch_hw[0], tuple((w, w) for w in windows), spec.mlp_ratio)


def _claims(spec: ViTSpec) -> bool:
    if spec.stages is None:
        return False
    merges = [p.transition for p in spec.stage_plans()[1:]]
    return (any(p.selections["attention"].params.get("rel_pos") == "cpb" for p in spec.block_plans())
            or any(t.name == "patch_merge" and t.params.get("norm_last") for t in merges))


def swin_v2_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``SwinTransformerV2`` (any ``swinv2_*`` name but ``swinv2_cr_*``)."""
    fail = refuser(spec, "SwinTransformerV2")
    if not spec.final_norm:
        raise fail("no final norm (Swin v2 norms every token before pooling)")
    if any(p.transition.name != "patch_merge" or not p.transition.params.get("norm_last")
           for p in spec.stage_plans()[1:]):
        raise fail("stage transitions other than patch_merge with norm_last")
    if any(p.selections["block"] != spec.selection("block") for p in spec.block_plans()):
        raise fail("per-block overrides of the block")
    windows, pretrained, _, ap = stage_windows(spec, ex, fail, "Swin v2", FIXED, "cpb", True, ("mlp", "norm"), True)
    if ap["qkv_bias"] is True or ap["cpb_hidden"] != 512:
        raise fail("a key bias (Swin v2: qkv_bias qv or false) or a bias MLP other than 512 wide")
    return dict(common_kwargs(spec, windows, fail), qkv_bias=ap["qkv_bias"] == "qv",
                attn_drop_rate=ap.get("attn_drop", 0.0), pretrained_window_sizes=tuple(pretrained))


FAMILY = TimmFamily(
    "swin_transformer_v2", classes=("timm.models.swin_transformer_v2.SwinTransformerV2",), reader=SwinV2Reader,
    claims=_claims, timm_class="timm.models.swin_transformer_v2.SwinTransformerV2", kwargs=swin_v2_kwargs,
    state_dict=staged_state_dict(SWIN_V2, swin_v2_kwargs), tables=(SWIN_V2,),
)
