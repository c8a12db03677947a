"""vitlab's built-in components, registered through the same hook as any external plugin."""
from __future__ import annotations

from ..hookspecs import VITLAB_API, hookimpl
from .flops import EXTRA_ACTIVATION_HANDLES, EXTRA_FLOP_HANDLES, FREE_OPS
from . import (
    attention, block, distilled, map_pool, mlp, norm, patch_embed, pool, pos_embed, relpos, rope, subln, transition,
    window,
)
from . import class_attention, talking_heads  # CaiT (class_attention is shared with XCiT)
from . import fourier, xcit, xcit_stem  # XCiT
from . import naflex  # NaFlexVit
from . import sam  # Segment Anything
from . import convit  # ConViT
from . import hybrid  # hybrid CNN stems (timm's HybridEmbed)
from . import diff_attention  # differential attention (timm DiffAttention)
from . import glu, pixel_norm, qkv_norm, sandwich, vlm_pool, vlm_pos  # VLM towers: Qwen3-VL, Gemma 4, DeepSeek
from . import swin_v2  # Swin v2 and v2-cr: continuous position bias, cosine attention, norm3 blocks
from . import pvt  # PVTv2: spatial-reduction attention, conv MLP, overlapping patch embedding
from . import twins  # Twins: CPVT's position generator after each stage's first block
from . import levit  # LeViT: BN-linear attention with offset biases, subsample transition, conv stem
from . import mvit  # MViTv2: pooling attention, pooling block transition, padded conv stem
from . import hiera  # Hiera and SAM 2's Hiera: q-pooling transition, absolute-window positions
from . import nest  # NesT: block aggregation (conv, norm, max pool) with a position table per level
from . import coat  # CoaT-Lite: per-stage conv position encodings, factorized attention, class token per stage
from . import volo  # VOLO: outlook attention, conv stem, downsample with its position table, token-labeling head
from . import davit  # DaViT: channel attention, conv position encodings in the block, norm-conv downsample
from . import tiny_vit  # TinyViT: MBConv blocks, window attention with offset biases, local conv, conv merging
from . import gcvit  # GCViT: global query tokens per stage, MBConv stem and downsampler

vitlab_api = VITLAB_API  # the built-ins are a plugin like any other

MODULES = (patch_embed, pos_embed, rope, attention, subln, relpos, mlp, norm, block, pool, map_pool, distilled,
           transition, window, class_attention, talking_heads, xcit_stem, fourier, xcit, naflex, sam, convit,
           hybrid, diff_attention,
           vlm_pos, vlm_pool, pixel_norm, qkv_norm, glu, sandwich, swin_v2, pvt, twins, levit, mvit, hiera, nest, volo, coat, davit, gcvit, tiny_vit)


@hookimpl
def vitlab_register_components(register) -> None:
    for module in MODULES:
        for cls in module.COMPONENTS:
            register(cls)


@hookimpl
def vitlab_flop_handles(register) -> None:
    """The operators built-ins emit that plain fvcore does not count (fused attention, RMSNorm,
    bicubic resampling) and those that are free by convention; see ``vitlab.components.flops``."""
    for op, flops in EXTRA_FLOP_HANDLES.items():
        register(op, flops=flops, activations=EXTRA_ACTIVATION_HANDLES.get(op))
    for op, reason in FREE_OPS.items():
        register(op, free=reason)
