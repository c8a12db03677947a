"""timm's ``NaFlexVit`` (NaFlex ViTs, SigLIP 2 NaFlex, C-RADIO) <-> ``ViTSpec``.

Given an image batch (B, C, H, W), a NaFlexVit is a ViT whose embedding is one ``NaFlexEmbeds``
module: a conv or linear patch projection (``conv``, ``linear``, or ``naflex`` for its default
pixel-major (ph, pw, C) patch layout), an optional norm, a learned position table of its own grid
resampled to each image's grid (the ``naflex`` position encoding), and class / register tokens
without positions. Blocks, norms and pooling are timm's ``VisionTransformer``'s and are read (and
written back) as such. The state-dict differences are the ``NAFLEX`` family table.

NaFlexVit accepts any image size (``dynamic_img_size: true``). Its variable-resolution path (patch
dicts with coordinates and validity masks) is not vitlab's forward: what only acts there
(``pos_embed_use_grid_sample``, ``use_key_only_attn_mask``, the patch-size interpolator) leaves an
image's outputs unchanged and is not read. timm keeps no image size when the table's grid is given,
so the spec's ``img_size`` is the model's default input size (``pretrained_cfg``), else the table's
grid in pixels.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import WeightsError
from ...selection import as_pair
from ...spec import ViTSpec
from ..reader import BlockRead, fmt_float
from ..bridge import Family
from ..export import refuser
from ..family import Exporting, TimmFamily
from .vit import VitReader

# timm's NaFlexVit: one ``embeds`` module holds the patch projection and its norm, the class /
# register tokens and the position table(s) of ``naflex``, each kept in timm's own layout
NAFLEX = Family(
    "naflexvit", marker=r"embeds\.(proj|pos_embed|cls_token|reg_token)",
    renames=(("embeds.proj.{rest}", "patch_embed.proj.{rest}"), ("embeds.norm.{rest}", "patch_embed.norm.{rest}"),
             ("embeds.cls_token", "cls_token"), ("embeds.reg_token", "reg_token"),
             ("embeds.pos_embed", "pos_embed.weight"), ("embeds.pos_embed_y", "pos_embed.weight_y"),
             ("embeds.pos_embed_x", "pos_embed.weight_x")),
)


class NaFlexReader(VitReader):
    """Reads a timm ``NaFlexVit`` instance (its modules and shapes, never its name)."""

    def image_size(self) -> tuple[int, int]:
        """The spec's default image size (NaFlexVit itself takes any)."""
        from timm.models.naflexvit import NaFlexVitCfg

        e = self.m.embeds
        if e.default_img_size is not None:  # built from img_size (no table grid given)
            return tuple(e.default_img_size)
        size = (getattr(self.m, "pretrained_cfg", None) or {}).get("input_size")
        if size:
            return int(size[-2]), int(size[-1])
        grid = e.pos_embed_grid_size or NaFlexVitCfg.pos_embed_grid_size
        return grid[0] * e.patch_size[0], grid[1] * e.patch_size[1]

    def patch_embed(self) -> dict:
        e, D = self.m.embeds, self.m.embed_dim
        if e.norm_input is not None:
            raise self.unsupported("norm before the patch projection (input_norm_layer)")
        ph, pw = e.patch_size
        h, w = self.image_size()
        pad = bool(e.dynamic_img_pad)
        crops = bool(h % ph or w % pw) and not pad
        params: dict[str, Any] = {}
        if e.is_linear:
            proj = self.linear(e.proj, "embeds.proj")
            if proj.in_features != ph * pw * e.in_chans:
                raise self.unsupported(f"linear patch projection of {proj.in_features} inputs")
            if crops:  # timm's patchify cannot split such an image at all
                raise self.unsupported(f"default image size {h}x{w} not divisible by the {ph}x{pw} patch "
                                       "without dynamic_img_pad")
            name = "naflex" if e.channels_last else "linear"  # pixel-major (ph, pw, C) or (C, ph, pw)
        else:
            proj = e.proj
            if type(proj) is not nn.Conv2d or (
                    tuple(proj.kernel_size) != (ph, pw) or tuple(proj.stride) != (ph, pw)
                    or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1) or proj.groups != 1
                    or proj.padding_mode != "zeros"):
                raise self.unsupported("patch projection other than a conv with kernel = stride = patch size")
            if crops:  # the conv leaves out the pixels past the last whole patch: an explicit stride says so
                if ph != pw:
                    raise self.unsupported(f"default image size {h}x{w} not divisible by non-square {ph}x{pw} "
                                           "patches (timm crops)")
                params["stride"] = int(ph)
            name = "conv"
        if (proj.out_features if e.is_linear else proj.out_channels) != D:
            raise self.unsupported("patch projection of another width than embed_dim")
        has_norm = not self.is_id(e.norm)
        if has_norm:
            self.norm(e.norm, "embeds.norm")
        return {
            "img_size": [h, w] if h != w else h,
            "patch_size": [ph, pw] if ph != pw else ph,
            "in_chans": e.in_chans,
            "patch_embed": {"name": name, "params": {"bias": proj.bias is not None, "norm": has_norm, "pad": pad,
                                                     **params}},
        }

    def positions(self) -> dict:
        """The ``naflex`` table (2-D or factorized) with how NaFlexEmbeds resamples it, or none."""
        e, D = self.m.embeds, self.m.embed_dim
        if e.pos_embed_type == "none":
            return {"name": "none"}
        if e.pos_embed_type == "factorized":
            y, x = e.pos_embed_y, e.pos_embed_x
            if y.ndim != 3 or x.ndim != 3 or y.shape[2] != D or x.shape[2] != D:
                raise self.unsupported(f"factorized position tables of shapes {tuple(y.shape)}, {tuple(x.shape)}")
            grid = (int(y.shape[1]), int(x.shape[1]))
            params: dict[str, Any] = {"factorized": True}  # resampled linearly, whatever the 2-D settings say
        elif e.pos_embed_type == "learned":
            pe = e.pos_embed
            if pe.ndim != 4 or pe.shape[3] != D:
                raise self.unsupported(f"position table of shape {tuple(pe.shape)}")
            grid = (int(pe.shape[1]), int(pe.shape[2]))
            mode = e.pos_embed_interp_mode
            if mode not in ("bicubic", "bilinear"):
                raise self.unsupported(f"position table resampled with mode '{mode}'")
            params = {"factorized": False, "mode": mode, "antialias": bool(e.pos_embed_antialias),
                      "align_corners": bool(e.pos_embed_align_corners)}
        else:
            raise self.unsupported(f"position embedding '{e.pos_embed_type}'")
        params["grid"] = list(grid) if grid[0] != grid[1] else grid[0]
        params["ar_preserving"] = bool(e.pos_embed_ar_preserving)
        return {"name": "naflex", "params": params}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        from timm.models.eva import EvaBlock

        if isinstance(b, EvaBlock):
            raise self.unsupported(f"EVA-style block (attn_type, rope_type, swiglu_mlp, attn_gated, num_kv_heads "
                                   f"or attn_only_layer_scale) at blocks.{i}")
        return super().block(b, i, dim, where)

    def spec(self) -> ViTSpec:
        from timm.models.naflexvit import NaFlexEmbeds, NaFlexVit

        m = self.m
        if type(m) is not NaFlexVit:
            raise self.unsupported(f"NaFlexVit subclass {type(m).__name__}")
        if type(m.embeds) is not NaFlexEmbeds:
            raise self.unsupported(f"embedding {type(m.embeds).__name__}")
        if m.rope is not None:
            raise self.unsupported(f"rotary position embedding {type(m.rope).__name__} (rope_type)")
        if m.patch_drop is not None:
            raise self.unsupported("patch dropout (patch_drop_rate)")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        blocks = self.head_and_blocks(data)
        e = m.embeds
        data["class_token"] = e.cls_token is not None
        data["reg_tokens"] = 0 if e.reg_token is None else int(e.reg_token.shape[1])
        if m.num_prefix_tokens != int(data["class_token"]) + data["reg_tokens"]:
            raise self.unsupported("prefix tokens other than one class token and register tokens")
        data["pos_embed"] = self.positions()
        heads, hidden = data["num_heads"], blocks[0].mlp["hidden"]
        pool, final, fc_as_final = self.norms_and_pool(data, heads, hidden)
        if final and fc_as_final:
            raise self.unsupported("both a final norm and fc_norm after token pooling")
        data.update(final_norm=final or fc_as_final, pool=pool, dynamic_img_size=True)
        return self.finish(data, blocks)

    def finish(self, data: dict[str, Any], blocks: list[dict]) -> ViTSpec:
        spec = super().finish(data, blocks)
        rate = fmt_float(self.m.embeds.pos_drop.p)  # NaFlexVit's position dropout sits in its embedding
        if rate == spec.pos_drop_rate:
            return spec
        return self.validated({**spec.to_dict(), "pos_drop_rate": rate})


# --- spec -> timm --------------------------------------------------------------------------------

# VisionTransformer arguments NaFlexVit has under another name, and those it has not (its embedding
# is set from the spec's own selections)
_RENAMED = {"scale_attn_norm": "scale_attn_inner_norm"}
_DROPPED = ("pos_embed", "no_embed_class", "dynamic_img_size")


def naflex_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``NaFlexVit`` (``NaFlexVit(**kw)`` or any ``naflexvit_*`` name)."""
    from ...recipes import load_spec

    fail = refuser(spec, "NaFlexVit")
    pe, pos = spec.patch_embed, spec.pos_embed
    if spec.stages is not None:
        raise fail("stages (NaFlexVit is isotropic)")
    if pe.name not in ("naflex", "linear", "conv"):
        raise fail(f"patch embedding '{pe.name}'")
    if pos.name not in ("naflex", "none"):
        raise fail(f"position encoding '{pos.name}' (NaFlexVit: naflex or none)")
    if spec.block.name == "parallel":
        raise fail("parallel block (NaFlexVit's blocks are written back as Block or ResPostBlock)")
    # everything but the embedding is timm's VisionTransformer: its checks and arguments, read off
    # the same spec with a plain embedding
    plain = spec.to_dict()
    plain.update(patch_embed={"name": "conv" if pe.name == "conv" else "linear", "params": dict(pe.params)},
                 pos_embed={"name": "none"})
    vit = ex.kwargs(load_spec(plain, registry=ex.registry))
    kw = {_RENAMED.get(k, k): v for k, v in vit.items() if k not in _DROPPED}

    img = spec.img_hw
    grid = tuple(s // p for s, p in zip(img, spec.patch_hw))  # the grid NaFlexEmbeds derives from img_size
    kw.update(embed_proj_type="conv" if pe.name == "conv" else "linear", patchify_channels_last=pe.name == "naflex",
              img_size=img if img[0] != img[1] else img[0])
    if pos.name == "none":
        kw.update(pos_embed="none", pos_embed_grid_size=None)
    else:
        p = pos.params
        table = as_pair(p["grid"])
        kw.update(pos_embed="factorized" if p["factorized"] else "learned",
                  # none: derived from img_size, which timm then keeps (and reading back finds)
                  pos_embed_grid_size=None if table == grid else table,
                  pos_embed_interp_mode=p["mode"], pos_embed_antialias=p["antialias"],
                  pos_embed_align_corners=p["align_corners"], pos_embed_ar_preserving=p["ar_preserving"])
    return kw


def naflex_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A vitlab model's weights in timm NaFlexVit's names (``NAFLEX`` read backwards)."""
    spec = model.spec
    kw = naflex_kwargs(spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    # the pool's weights: the attention pool's, or the norm after pooling (timm's fc_norm)
    pool_from, pool_to = ("pool.", "attn_pool.") if spec.pool.name == "map" else ("pool.norm.", "fc_norm.")
    out = {(pool_to + k[len(pool_from):] if k.startswith(pool_from) else k): v for k, v in sd.items()}
    unknown = [k for k in out if k.startswith("pool.")]
    if unknown:  # pragma: no cover - a pool with weights this converter does not know
        raise WeightsError(f"no timm NaFlexVit name for: {', '.join(unknown)}")
    D = spec.embed_dim
    # biases timm has and the spec lacks are zeros: the patch projection's (unless pre_norm), the MLP's
    if "patch_embed.proj.bias" not in out and not spec.pre_norm:
        out["patch_embed.proj.bias"] = out["patch_embed.proj.weight"].new_zeros(D)
    if not spec.mlp.params.get("bias", True) and kw["proj_bias"]:
        fc1 = ("fc1_g", "fc1_x") if spec.mlp.name == "swiglu" else ("fc1",)
        for i in range(spec.depth):
            for name in (*fc1, "fc2"):
                weight = out[f"blocks.{i}.mlp.{name}.weight"]
                out[f"blocks.{i}.mlp.{name}.bias"] = weight.new_zeros(weight.shape[0])
    return NAFLEX.restore(out)


FAMILY = TimmFamily(
    "naflexvit", classes=("timm.models.naflexvit.NaFlexVit",), reader=NaFlexReader,
    claims=lambda spec: "naflex" in (spec.patch_embed.name, spec.pos_embed.name),
    timm_class="timm.models.naflexvit.NaFlexVit", kwargs=naflex_kwargs, state_dict=naflex_state_dict,
    # NaFlexVit takes any size and keeps none when its table grid is given: img_size is then only
    # the nominal size, which a model built from these kwargs reads back as table grid x patch
    unkept=("img_size",), tables=(NAFLEX,),
)
