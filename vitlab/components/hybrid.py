"""Hybrid patch embedding (timm's ``HybridEmbed``): a CNN backbone from timm turns the image into a
feature map, one conv projects that map to tokens. R50+ViT (Dosovitskiy et al. 2020), the AugReg
R26 / R50 / R-Ti hybrids, timm's ResNet-D hybrids and MobileCLIP's convolutional stem.

A recipe never names code: it is data, possibly untrusted, so it picks a row of :data:`BACKBONES`,
a table vitlab owns. Each row builds its network exactly as ``timm/models/vision_transformer_hybrid.py``
does (the timm constructor and its fixed arguments) and validates the few numbers the family
varies (ResNetV2's stage depths, the ResNet-D stage whose features are taken). The same row is
read both ways: ``timm_interop.hybrid`` finds the row a timm backbone was built from, and export
builds timm's backbone from it again. Parameter names are timm's (``patch_embed.backbone.*``,
``patch_embed.proj``), so timm's weights load by identity.

Sizes: the recipe's ``patch_size`` is the pixels per token, the backbone's stride times the
projection's kernel (timm's ``patch_size``). ``vit_base_r50_s16_384``: stride 16, kernel 1 -> 16;
``vit_tiny_r_s16_p8_224``: the stem's stride 4, kernel 8 -> 32.
"""
from __future__ import annotations

import functools
from typing import Annotated, Any, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from ..component import PatchEmbed
from ..context import BuildContext
from ..errors import unknown_choice

StageDepth = Annotated[StrictInt, Field(gt=0, le=64)]


def _timm_attr(module: str, attr: str) -> Any:
    """``timm.<module>.<attr>``, imported only when a backbone is built (``import vitlab`` stays light)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"timm.{module}"), attr)
    except ImportError as exc:
        raise ValueError(f"the hybrid patch embedding builds its CNN with timm, which is not installed ({exc})") from None


def _std_conv_same():
    """The weight-standardised conv with TF 'SAME' padding of timm's ``_resnetv2(padding_same=True)``."""
    return functools.partial(_timm_attr("layers", "StdConv2dSame"), eps=1e-8)


# --- the table --------------------------------------------------------------------------------------

class Backbone(BaseModel):
    """A row of :data:`BACKBONES`: one timm CNN as timm's hybrid ViTs build it. Subclasses give
    the constructor and its arguments, the feature map's stride and width, and (for the reader)
    the varying numbers of an already built network."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    in_chans_arg: ClassVar[str] = "in_chans"  # what the constructor calls the image channels
    name: str

    @property
    def stride(self) -> int:
        """Pixels per feature-map cell."""
        raise NotImplementedError

    @property
    def channels(self) -> int:
        """Width of the feature map."""
        raise NotImplementedError

    def constructor(self) -> tuple[Any, dict[str, Any]]:
        """timm's callable and its arguments, ``in_chans`` and device / dtype aside."""
        raise NotImplementedError

    @classmethod
    def args_of(cls, net: nn.Module) -> dict[str, Any] | None:
        """This row's varying fields read off a built timm network, ``None`` when it is not of the
        type this row builds (the reader then compares the rebuilt network, so these need not
        be sure)."""
        raise NotImplementedError

    def build(self, in_chans: int, device=None, dtype=None) -> nn.Module:
        fn, kwargs = self.constructor()
        return fn(**{self.in_chans_arg: in_chans}, **kwargs, device=device, dtype=dtype)


class ResNetV2Stem(Backbone):
    """ResNetV2's stem alone (R+ViT-Ti): 7x7/2 StdConv2dSame, GroupNorm + ReLU, 3x3/2 SAME max
    pool; stride 4, 64 channels (timm ``_resnetv2(layers=())``)."""

    in_chans_arg = "in_chs"
    name: Literal["resnetv2_stem"] = "resnetv2_stem"

    @property
    def stride(self) -> int:
        return 4

    @property
    def channels(self) -> int:
        return 64

    def constructor(self):
        return _timm_attr("models.resnetv2", "create_resnetv2_stem"), dict(
            stem_type="same", preact=False, conv_layer=_std_conv_same())

    @classmethod
    def args_of(cls, net):
        return {} if type(net) is nn.Sequential and hasattr(net, "conv") and hasattr(net, "pool") else None


class ResNetV2(Backbone):
    """ResNetV2 without pre-activation (R26, R50 hybrids): the stem, then bottleneck stages of
    256, 512, 1024, 2048 channels, stride 1 then 2 each (timm ``_resnetv2(layers)``)."""

    name: Literal["resnetv2"] = "resnetv2"
    layers: tuple[StageDepth, ...] = Field(
        (3, 4, 9), min_length=1, max_length=4, description="bottleneck blocks per stage (R50 s16: 3, 4, 9)")

    @property
    def stride(self) -> int:
        return 4 * 2 ** (len(self.layers) - 1)

    @property
    def channels(self) -> int:
        return 256 * 2 ** (len(self.layers) - 1)

    def constructor(self):
        return _timm_attr("models.resnetv2", "ResNetV2"), dict(
            layers=self.layers, num_classes=0, global_pool="", preact=False, stem_type="same",
            conv_layer=_std_conv_same())

    @classmethod
    def args_of(cls, net):
        if type(net).__name__ != "ResNetV2" or not hasattr(net, "stages"):
            return None
        return {"layers": tuple(len(stage.blocks) for stage in net.stages)}


class _ResNetD(Backbone):
    """timm's ResNet-D as ``features_only`` with one ``out_indices`` stage (timm's hybrids)."""

    timm_name: ClassVar[str]
    out_index: Annotated[StrictInt, Field(ge=0, le=4)] = Field(
        4, description="the stage whose features are taken (timm's out_indices=[i]): stride 2**(i+1)")

    @property
    def stride(self) -> int:
        return 2 ** (self.out_index + 1)

    @property
    def channels(self) -> int:
        return (64, 256, 512, 1024, 2048)[self.out_index]

    def constructor(self):
        return _timm_attr("models.resnet", self.timm_name), dict(
            pretrained=False, features_only=True, out_indices=[self.out_index])

    @classmethod
    def args_of(cls, net):
        info = getattr(net, "feature_info", None)
        if type(net).__name__ != "FeatureListNet" or len(getattr(info, "out_indices", ())) != 1:
            return None
        return {"out_index": int(info.out_indices[0])}


class ResNet26d(_ResNetD):
    """ResNet-26-D, features of one stage (``vit_*_resnet26d_224``)."""

    timm_name = "resnet26d"
    name: Literal["resnet26d"] = "resnet26d"


class ResNet50d(_ResNetD):
    """ResNet-50-D, features of one stage (``vit_*_resnet50d_*``)."""

    timm_name = "resnet50d"
    name: Literal["resnet50d"] = "resnet50d"


class MciStem(Backbone):
    """MobileCLIP's convolutional stem (``vit_base_mci_224``): 4x4/4 conv, BatchNorm, GELU, 2x2/2
    conv, BatchNorm, GELU, 2x2/2 conv with bias; 192, 192, 768 channels, stride 16."""

    name: Literal["mci_stem"] = "mci_stem"

    @property
    def stride(self) -> int:
        return 16

    @property
    def channels(self) -> int:
        return 768

    def constructor(self):
        return _timm_attr("models.vision_transformer_hybrid", "ConvStem"), dict(
            channels=(768 // 4, 768 // 4, 768), stride=(4, 2, 2), kernel_size=(4, 2, 2), padding=0,
            act_layer=nn.GELU)

    @classmethod
    def args_of(cls, net):
        return {} if type(net).__name__ == "ConvStem" else None


BACKBONES: dict[str, type[Backbone]] = {
    row.model_fields["name"].default: row for row in (ResNetV2Stem, ResNetV2, ResNet26d, ResNet50d, MciStem)
}
"""The CNN backbones a recipe may name, by name."""

BackboneChoice = Annotated[Union[tuple(BACKBONES.values())], Field(discriminator="name")]  # one row, by its name


@functools.lru_cache(maxsize=32)
def meta_network(backbone: Backbone, in_chans: int, dtype: torch.dtype | None = None) -> nn.Module:
    """The row's network on the meta device, in eval mode: structure and shapes only, nothing
    allocated. Shared (cached): callers read it and run it on meta tensors, never change it."""
    return backbone.build(in_chans, device="meta", dtype=dtype).eval()


@functools.lru_cache(maxsize=64)
def feature_shape(backbone: Backbone, in_chans: int, img_size: tuple[int, int]) -> tuple[int, ...]:
    """(C, H, W) of the feature map the backbone really produces, from a forward on the meta device
    (shapes only: nothing allocated, nothing computed)."""
    with torch.no_grad():
        out = meta_network(backbone, in_chans)(torch.empty(1, in_chans, *img_size, device="meta"))
    if isinstance(out, (list, tuple)):  # features_only: one map per out index
        out = out[-1]
    return tuple(out.shape[1:])


# --- the component ----------------------------------------------------------------------------------

class HybridPatchEmbed(PatchEmbed):
    """A timm CNN backbone from a fixed table (ResNetV2, ResNet-D, MobileCLIP's stem), then a conv
    from its feature map to tokens (timm's HybridEmbed: R50+ViT, MobileCLIP)."""

    name = "hybrid"

    class Params(PatchEmbed.Params):
        backbone: BackboneChoice = Field(
            default_factory=ResNetV2Stem,
            description="the CNN: {name: <one of " + ", ".join(BACKBONES) + ">} and that backbone's own numbers")
        proj: StrictBool = Field(
            True, description="a conv (kernel = stride = patch_size / the backbone's stride) to embed_dim; "
                              "false: the feature map is the tokens (its width must be embed_dim)")
        bias: StrictBool = Field(True, description="bias of that conv")

        @field_validator("backbone", mode="before")
        @classmethod
        def _known(cls, value: Any) -> Any:
            """A name outside the table is refused before anything is built, with the valid ones."""
            if isinstance(value, str):
                raise PydanticCustomError("hybrid_backbone", f"give the backbone as a mapping, {{name: {value}}} "
                                          f"(with its own numbers, if any); valid names: {', '.join(BACKBONES)}")
            if isinstance(value, dict) and "name" in value and value["name"] not in BACKBONES:
                raise PydanticCustomError("hybrid_backbone", unknown_choice("backbone", value["name"], BACKBONES,
                                                                            label="valid"))
            return value

    @staticmethod
    def kernel(patch_size: tuple[int, int], params: Params) -> tuple[int, int]:
        """The projection's kernel: what the patch leaves after the backbone's stride."""
        s = params.backbone.stride
        return patch_size[0] // s, patch_size[1] // s

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        bb, (ph, pw) = params.backbone, ctx.patch_size
        s = bb.stride
        if ph % s or pw % s:
            raise ValueError(f"backbone {bb.name} downsamples by {s}, which does not divide patch_size {ph}x{pw} "
                             "(the pixels per token: the backbone's stride times the projection's kernel)")
        if not params.proj:
            if (ph, pw) != (s, s):
                raise ValueError(f"without proj the feature map is the tokens: patch_size must be the backbone's "
                                 f"stride {s}, not {ph}x{pw}")
            if bb.channels != ctx.embed_dim:
                raise ValueError(f"without proj the feature map is the tokens: embed_dim must be the backbone's "
                                 f"{bb.channels} channels, not {ctx.embed_dim}")
        (h, w), want = ctx.img_size, (bb.channels, ctx.img_size[0] // s, ctx.img_size[1] // s)
        got = feature_shape(bb, ctx.in_chans, (h, w))
        if got != want:  # the table's stride and width against the network itself
            raise ValueError(f"backbone {bb.name} gives a {'x'.join(map(str, got))} feature map at {h}x{w}, "
                             f"not the {'x'.join(map(str, want))} its stride and width promise")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        bb = params.backbone
        self.backbone = bb.build(ctx.in_chans, **ctx.factory_kwargs)
        if params.proj:
            k = self.kernel(ctx.patch_size, params)
            self.proj = nn.Conv2d(bb.channels, ctx.embed_dim, kernel_size=k, stride=k, bias=params.bias,
                                  **ctx.factory_kwargs)
        else:
            self.proj = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)  # (B, C, H / s, W / s)
        if isinstance(x, (list, tuple)):  # a features_only backbone: its one map
            x = x[-1]
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh * gw, D)


COMPONENTS = (HybridPatchEmbed,)
