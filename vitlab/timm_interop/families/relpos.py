"""timm's ``VisionTransformerRelPos`` (``vision_transformer_relpos``: ``vit_relpos_*``,
``vit_srelpos_*``) <-> ``ViTSpec``.

A ViT without an absolute position table whose attention adds a relative position bias: from a
small MLP over log-spaced offsets (timm ``RelPosMlp``, ``cr`` mode) per block
(``mhsa_relpos_mlp``) or shared by every block (the position encoding ``relpos_mlp``), or from a
table (``RelPosBias``: ``mhsa_relpos``). Which bias module is which component is one table,
``RELPOS_BIASES``, that reading and exporting share; the state-dict differences are the
``RELPOS`` family table.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import (
    check_plain_attention, check_uniform_blocks, common_kwargs, conv_patch_embed, fc_norm_of, refuser,
    written_back,
)
from ..family import Exporting, TimmFamily
from ..reader import BlockRead
from .beit import OneNormReader

# timm's VisionTransformerRelPos: the bias shared by every block is vitlab's position encoding
# (``relpos_mlp``); a per-block table sits in ``mhsa_relpos`` itself, not in a ``rel_pos`` module
# (the per-block MLP keeps timm's ``attn.rel_pos.mlp`` names)
RELPOS = Family(
    "relpos", marker=r"(blocks\.\d+\.attn\.rel_pos|shared_rel_pos)\.",
    renames=(("shared_rel_pos.{rest}", "pos_embed.rel_pos.{rest}"),
             ("blocks.{block}.attn.rel_pos.relative_position_bias_table",
              "blocks.{block}.attn.relative_position_bias_table")),
)


class BiasModule(NamedTuple):
    """One of timm's relative position bias modules and the vitlab component that is it."""

    rel_pos_type: str  # timm's ``rel_pos_type``: ``mlp`` (RelPosMlp, cr mode) or ``bias`` (RelPosBias)
    shared: bool  # timm's ``shared_rel_pos``: one module for every block
    kind: str  # where vitlab keeps it: the attention's own, or the position encoding's
    component: str
    hidden: str | None  # the param holding the MLP's hidden width (timm's ``rel_pos_dim``)


# timm's relative position bias modules <-> vitlab's components; the reader looks up what a timm
# model has, the export what a spec needs (a table shared by every block is not in vitlab)
RELPOS_BIASES: tuple[BiasModule, ...] = (
    BiasModule("mlp", False, "attention", "mhsa_relpos_mlp", "bias_hidden"),
    BiasModule("bias", False, "attention", "mhsa_relpos", None),
    BiasModule("mlp", True, "pos_embed", "relpos_mlp", "hidden"),
)


def _bias_for(rel_pos_type: str, shared: bool) -> BiasModule | None:
    return next((b for b in RELPOS_BIASES if (b.rel_pos_type, b.shared) == (rel_pos_type, shared)), None)


class RelPosReader(OneNormReader):
    """Reads a timm ``VisionTransformerRelPos`` instance (its modules and shapes, never its name)."""

    def rel_pos(self, r: nn.Module, heads: int, where: str) -> tuple[str, int | None]:
        """The bias module: its ``rel_pos_type`` (``mlp`` or ``bias``) and the MLP's hidden width."""
        from timm.layers import Mlp
        from timm.layers.pos_embed_rel import RelPosBias, RelPosMlp

        m, t = self.m, type(r)
        if tuple(r.window_size) != tuple(m.patch_embed.grid_size):
            raise self.unsupported(f"relative position window {tuple(r.window_size)} other than the patch grid "
                                   f"at {where}")
        if r.prefix_tokens != m.num_prefix_tokens:
            raise self.unsupported(f"relative position bias over {r.prefix_tokens} prefix tokens at {where}")
        if t is RelPosBias:
            return "bias", None
        if t is not RelPosMlp:
            raise self.unsupported(f"relative position module {t.__name__} at {where}")
        if r.mode != "cr" or not self.is_id(r.bias_act) or r.bias_gain is not None:
            raise self.unsupported(f"relative position MLP in '{r.mode}' mode (rel_pos_type 'mlp_swin') at {where}")
        mlp = r.mlp
        if type(mlp) is not Mlp or not self.is_id(mlp.norm) or type(mlp.act) is not nn.ReLU:
            raise self.unsupported(f"relative position MLP other than fc1 -> ReLU -> fc2 at {where}")
        fc1, fc2 = self.linear(mlp.fc1, f"{where}.mlp.fc1"), self.linear(mlp.fc2, f"{where}.mlp.fc2")
        if fc1.in_features != 2 or fc2.out_features != heads or fc1.bias is None or fc2.bias is None:
            raise self.unsupported(f"relative position MLP of other shape or without biases at {where}")
        if mlp.drop1.p != 0.125 or mlp.drop2.p != 0.0:
            raise self.unsupported(f"relative position MLP with dropout other than timm's 0.125 at {where}")
        return "mlp", fc1.out_features

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.models.vision_transformer_relpos import RelPosAttention

        if type(a) is not RelPosAttention:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        params = self.qkv_attention(a, where, check_proj=False)
        name = "mhsa"
        if a.rel_pos is not None:
            rel_pos_type, hidden = self.rel_pos(a.rel_pos, a.num_heads, f"{where}.rel_pos")
            bias = _bias_for(rel_pos_type, shared=False)
            name = bias.component
            if bias.hidden:
                params[bias.hidden] = hidden
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p, "name": name}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        from timm.models.vision_transformer_relpos import RelPosBlock, ResPostRelPosBlock

        where = where or f"blocks.{i}"
        t = type(b)
        if t not in (RelPosBlock, ResPostRelPosBlock):
            raise self.unsupported(f"block type {t.__module__}.{t.__name__} at {where}")
        return self.two_branch(b, where, post=t is ResPostRelPosBlock)

    def spec(self) -> ViTSpec:
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos

        m = self.m
        if type(m) is not VisionTransformerRelPos:
            raise self.unsupported(f"VisionTransformerRelPos subclass {type(m).__name__}")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        blocks = self.head_and_blocks(data)
        data["class_token"], data["reg_tokens"] = m.cls_token is not None, 0
        if m.num_prefix_tokens != int(data["class_token"]) or (
                m.cls_token is not None and tuple(m.cls_token.shape) != (1, 1, m.embed_dim)):
            raise self.unsupported("prefix tokens other than one class token")
        data["pos_embed"] = {"name": "none"}
        if m.shared_rel_pos is not None:
            rel_pos_type, hidden = self.rel_pos(m.shared_rel_pos, blocks[0].attn["heads"], "shared_rel_pos")
            bias = _bias_for(rel_pos_type, shared=True)
            if bias is None:
                raise self.unsupported("relative position table shared by all blocks (shared_rel_pos with "
                                       "rel_pos_type 'bias')")
            data["pos_embed"] = {"name": bias.component, "params": {bias.hidden: hidden}}
        self.final_norm_and_pool(data)
        data["dynamic_img_size"] = False  # timm's model takes its one image size
        return self.finish(data, blocks)


# --- spec -> timm --------------------------------------------------------------------------------

def _biases(spec: ViTSpec) -> list[BiasModule]:
    """The ``RELPOS_BIASES`` rows the spec selects."""
    return [b for b in RELPOS_BIASES if spec.selection(b.kind).name == b.component]


def _is_relpos(spec: ViTSpec) -> bool:
    """A relative position bias MLP (per block or shared), or a table per block without the class
    token (with it, a ``Beit``); RoPE is Eva's."""
    if spec.stages is not None or spec.pos_embed.name == "rope":
        return False
    return any(b.rel_pos_type == "mlp" for b in _biases(spec)) or (
        spec.attention.name == "mhsa_relpos" and not spec.class_token)


def relpos_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``VisionTransformerRelPos`` (any ``vit_relpos_*`` /
    ``vit_srelpos_*`` name) for a spec with one relative position bias (``RELPOS_BIASES``).

    Raises:
        SpecError: the spec uses something ``VisionTransformerRelPos`` cannot express (named).
    """
    from timm.layers import get_act_layer
    from timm.models.vision_transformer_relpos import RelPosBlock, ResPostRelPosBlock

    fail = refuser(spec, "VisionTransformerRelPos")
    check_uniform_blocks(spec, fail)
    attn, mlp, block = spec.attention, spec.mlp, spec.block
    plain = {"attention": "mhsa", "pos_embed": "none"}  # what a kind is without a bias module
    for kind, name in plain.items():
        allowed = (name, *(b.component for b in RELPOS_BIASES if b.kind == kind))
        if spec.selection(kind).name not in allowed:
            raise fail(f"{kind} '{spec.selection(kind).name}' (VisionTransformerRelPos: {', '.join(allowed)})")
    biases = _biases(spec)
    if len(biases) != 1:
        raise fail("a relative position bias shared by every block and one per block together (timm's "
                   "VisionTransformerRelPos has one or the other)" if biases else "no relative position bias")
    bias = biases[0]
    check_plain_attention(spec, fail)
    if mlp.name != "mlp" or not mlp.params.get("bias", True) or mlp.params.get("norm"):
        raise fail(f"mlp '{mlp.name}' with {mlp.params} (VisionTransformerRelPos: an MLP with biases, no norm)")
    if block.name == "prenorm" and not block.params.get("attn_only_layer_scale"):
        block_fn, init_values = RelPosBlock, block.params.get("init_values")
    elif block.name == "respostnorm" and block.params.get("init_values") is None:
        block_fn, init_values = ResPostRelPosBlock, None  # timm's init_values only initialise its norms
    else:
        raise fail(f"block '{block.name}' {block.params} (pre-norm with layer scale on both branches or none, "
                   "or res-post-norm without)")
    if spec.norm.name not in ("layernorm", "rmsnorm"):
        raise fail(f"norm '{spec.norm.name}'")
    if conv_patch_embed(spec, fail):
        raise fail("padding images to whole patches (dynamic_img_pad)")
    if spec.reg_tokens:
        raise fail("register tokens")
    if spec.pre_norm or spec.pos_drop_rate or spec.dynamic_img_size:
        raise fail("pre_norm, pos_drop_rate or dynamic_img_size (VisionTransformerRelPos takes one image size)")
    return dict(
        common_kwargs(spec, fail),
        qkv_bias=attn.params["qkv_bias"],
        qk_norm=attn.params["qk_norm"],
        init_values=init_values,
        class_token=spec.class_token,
        fc_norm=fc_norm_of(spec, fail),
        rel_pos_type=bias.rel_pos_type,
        rel_pos_dim=spec.selection(bias.kind).params[bias.hidden] if bias.hidden else None,
        shared_rel_pos=bias.shared,
        act_layer=get_act_layer(mlp.params["act"]),
        block_fn=block_fn,
    )


FAMILY = TimmFamily(
    "vision_transformer_relpos", classes=("timm.models.vision_transformer_relpos.VisionTransformerRelPos",),
    reader=RelPosReader, claims=_is_relpos,
    timm_class="timm.models.vision_transformer_relpos.VisionTransformerRelPos", kwargs=relpos_kwargs,
    state_dict=functools.partial(written_back, table=RELPOS), tables=(RELPOS,),
)
