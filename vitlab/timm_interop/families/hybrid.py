"""timm's hybrid ViTs (``vision_transformer_hybrid``: R50+ViT, the AugReg R26 / R50 / R-Ti hybrids,
the ResNet-D hybrids, MobileCLIP's ``vit_base_mci_224``) <-> vitlab's ``hybrid`` patch embedder.

They are timm ``VisionTransformer`` instances whose ``patch_embed`` is a ``HybridEmbed``; everything
after the embedding is read and written back by the plain ViT path. The CNN is identified by the
row of ``components.hybrid.BACKBONES`` that builds the same network (module types, settings,
parameter shapes, compared with ``analysis.signature.block_signature``), and export builds timm's
backbone from that row again. Weights keep timm's names (``patch_embed.backbone.*``,
``patch_embed.proj.*``), so they load by identity.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from ...components.hybrid import BACKBONES, Backbone, HybridPatchEmbed, meta_network
from ...spec import ViTSpec
from ..export import refuser
from ..family import Exporting, TimmFamily
from .vit import VitReader, vit_class, vit_kwargs, vit_state_dict


# --- timm -> vitlab ---------------------------------------------------------------------------------

def _same_network(a: nn.Module, b: nn.Module) -> bool:
    from ...analysis.signature import block_signature

    return block_signature(a) == block_signature(b)


def backbone_row(reader, net: nn.Module, in_chans: int) -> Backbone:
    """The table row that builds ``net``: the rows of its type, with the numbers read off it,
    rebuilt on the meta device and compared whole."""
    dtype = next((p.dtype for p in net.parameters()), None)
    dtype = None if dtype == torch.get_default_dtype() else dtype  # the network check() builds too
    for row in BACKBONES.values():
        args = row.args_of(net)
        if args is None:
            continue
        try:
            candidate = row(**args)
        except ValidationError:  # numbers beyond the row's range: not this row
            continue
        if _same_network(meta_network(candidate, in_chans, dtype), net):
            return candidate
    raise reader.unsupported(f"hybrid CNN backbone {type(net).__name__} built unlike any of vitlab's "
                             f"({', '.join(BACKBONES)}, as timm's vision_transformer_hybrid builds them)")


class HybridReader(VitReader):
    """Reads a timm ``VisionTransformer`` whose ``patch_embed`` is a ``HybridEmbed``."""

    def patch_embed(self) -> dict[str, Any]:
        return read_hybrid_embed(self, self.m.patch_embed)


def read_hybrid_embed(reader, pe: nn.Module) -> dict[str, Any]:
    """``img_size``, ``patch_size`` (pixels per token), ``in_chans`` and the ``hybrid`` selection
    of a timm ``HybridEmbed``."""
    from timm.layers import Format

    embed_dim = reader.m.embed_dim
    bb = backbone_row(reader, pe.backbone, pe.in_chans)
    s = bb.stride
    (h, w), (kh, kw) = tuple(pe.img_size), tuple(pe.patch_size)
    if tuple(pe.feature_ratio) != (s, s) or pe.feature_dim != bb.channels:
        raise reader.unsupported(f"hybrid backbone {bb.name} with a {pe.feature_dim}-channel feature map at stride "
                                 f"{tuple(pe.feature_ratio)} (the table's: {bb.channels} at {s})")
    if h % (s * kh) or w % (s * kw):
        raise reader.unsupported(f"image size {h}x{w} not divisible by the hybrid embedding's {s * kh}x{s * kw} "
                                 "pixels per token")
    if tuple(pe.grid_size) != (h // (s * kh), w // (s * kw)):
        raise reader.unsupported(f"hybrid embedding grid {tuple(pe.grid_size)}")
    if not pe.flatten and pe.output_fmt != Format.NHWC:  # NHWC: timm's dynamic_img_size, same tokens
        raise reader.unsupported(f"hybrid embedding output format {pe.output_fmt}")
    if pe.dynamic_img_pad and (kh, kw) != (1, 1):
        raise reader.unsupported("hybrid embedding with dynamic_img_pad (padding the feature map to whole patches)")
    conv, proj = pe.proj, not reader.is_id(pe.proj)
    if proj and (type(conv) is not nn.Conv2d or tuple(conv.kernel_size) != (kh, kw) or tuple(conv.stride) != (kh, kw)
                 or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1) or conv.groups != 1
                 or conv.padding_mode != "zeros" or conv.in_channels != bb.channels or conv.out_channels != embed_dim):
        raise reader.unsupported("hybrid projection other than a conv with kernel = stride = patch size to embed_dim")
    if not proj and ((kh, kw) != (1, 1) or bb.channels != embed_dim):
        raise reader.unsupported("hybrid embedding without projection whose feature map is not the tokens")
    ph, pw = s * kh, s * kw
    return {
        "img_size": [int(h), int(w)] if h != w else int(h),
        "patch_size": [ph, pw] if ph != pw else ph,
        "in_chans": int(pe.in_chans),
        "patch_embed": {"name": "hybrid", "params": {"backbone": bb.model_dump(mode="json"), "proj": proj,
                                                     "bias": conv.bias is not None if proj else True}},
    }


# --- vitlab -> timm ---------------------------------------------------------------------------------

def hybrid_embed(backbone: Backbone, *, in_chans: int = 3, device=None, dtype=None, **kwargs: Any) -> nn.Module:
    """timm's ``HybridEmbed`` around a new backbone built from its table row: what ``embed_layer``
    is called with in timm's ``VisionTransformer``. A new backbone per call (timm's model functions
    build one per model too), on the model's device and dtype."""
    from timm.layers import HybridEmbed

    net = backbone.build(in_chans, device=device, dtype=dtype)
    return HybridEmbed(net, in_chans=in_chans, device=device, dtype=dtype, **kwargs)


def _plain(spec: ViTSpec, ex: Exporting) -> ViTSpec:
    """The same ViT with a conv patchify of the same pixels per token: what the plain export reads
    for everything after the embedding (its checks and arguments)."""
    from ...recipes import load_spec

    params = HybridPatchEmbed.Params.model_validate(spec.patch_embed.params)
    fail = refuser(spec, "VisionTransformer")
    if spec.stages is not None:
        raise fail("a hybrid CNN stem with stages (timm's hybrids are isotropic VisionTransformers)")
    if params.proj and params.bias == spec.pre_norm:
        raise fail(f"hybrid projection {'with' if params.bias else 'without'} bias and pre_norm={spec.pre_norm} "
                   "(timm's HybridEmbed has a projection bias exactly when pre_norm is off)")
    data = spec.to_dict()
    data["patch_embed"] = {"name": "conv", "params": {"bias": not spec.pre_norm}}
    plain = load_spec(data, registry=ex.registry)
    if ex.family(plain).timm_class is not vit_class:  # another family's class: it takes no hybrid embed_layer
        raise fail("a hybrid CNN stem in a model timm builds with another class than VisionTransformer")
    return plain


def hybrid_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """The plain ViT's arguments, with timm's ``patch_size`` (the projection's kernel) and an
    ``embed_layer`` that builds the backbone from the table."""
    params = HybridPatchEmbed.Params.model_validate(spec.patch_embed.params)
    kw = vit_kwargs(_plain(spec, ex), ex)
    kh, kw_ = HybridPatchEmbed.kernel(spec.patch_hw, params)
    kw.update(patch_size=kh if kh == kw_ else (kh, kw_), dynamic_img_pad=False,
              embed_layer=functools.partial(hybrid_embed, params.backbone, proj=params.proj))
    return kw


def _hybrid_state(spec: ViTSpec, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The embedding's weights already have timm's names (backbone, projection)."""
    return {k: sd.pop(k) for k in [k for k in sd if k.startswith("patch_embed.")]}


def _is_hybrid_model(model: nn.Module) -> bool:
    from timm.layers import HybridEmbed

    return type(model.patch_embed) is HybridEmbed


FAMILY = TimmFamily(
    "vision_transformer_hybrid",
    classes=("timm.models.vision_transformer.VisionTransformer", "timm.models.deit.VisionTransformerDistilled"),
    reader=HybridReader, accepts=_is_hybrid_model,
    claims=lambda spec: spec.patch_embed.name == "hybrid",
    timm_class=lambda spec, ex: vit_class(_plain(spec, ex)),
    kwargs=hybrid_kwargs,
    state_dict=functools.partial(vit_state_dict, embed=_hybrid_state),
)
