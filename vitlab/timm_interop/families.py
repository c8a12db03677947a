"""Every timm family's state-dict table (``bridge.Family``): its renames and fused or split
tensors relative to timm's plain ``VisionTransformer`` names, read forward by ``weights`` on load
(``family_of`` picks the table a checkpoint's keys match) and inverted on export
(``export_state_dict``). ``VITLAB`` and ``PARALLEL`` / ``SWIGLU_PACKED`` are timm's plain ViT's own
tables (no marker: the loader applies them itself).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..errors import WeightsError
from .bridge import ZERO, Family, Fuse, ImagePosFamily, Split, SplitFamily


# DeiT's distilled models: the distillation token is vitlab's first register token, its
# classifier the distilled pool's ``head.dist``
DEIT_DISTILLED = Family(
    "deit_distilled", marker=r"dist_token$",
    renames=(("dist_token", "reg_token"), ("head_dist.{rest}", "head.dist.{rest}")),
)

# EVA's and BEiT's fused qkv: q and v biases stored, the key bias always zero (a buffer outside
# the state dict)
_QV_BIAS = Fuse("blocks.{block}.attn.qkv.bias", ("blocks.{block}.attn.q_bias", ZERO, "blocks.{block}.attn.v_bias"))

# timm's Eva: bare layer-scale parameters; q / k / v kept apart, or fused with the zero key bias
EVA = Family(
    "eva", marker=r"(blocks\.\d+\.(gamma_[12]|attn\.(q_bias|v_bias|q_proj\.weight))|rope\.freqs)$",
    renames=(("blocks.{block}.gamma_1", "blocks.{block}.ls1.gamma"),
             ("blocks.{block}.gamma_2", "blocks.{block}.ls2.gamma"),
             ("rope.freqs", "pos_embed.freqs")),  # RoPE-Mixed's learned per-block frequencies
    fused=(
        Fuse("blocks.{block}.attn.qkv.weight", ("blocks.{block}.attn.q_proj.weight", "blocks.{block}.attn.k_proj.weight",
                                                "blocks.{block}.attn.v_proj.weight")),
        Fuse("blocks.{block}.attn.qkv.bias", ("blocks.{block}.attn.q_proj.bias", ZERO, "blocks.{block}.attn.v_proj.bias")),
        _QV_BIAS,
    ),
)

# timm's Beit: EVA's layer scales and fused q / v bias (zero key bias); each block's relative
# position table keeps timm's name in ``mhsa_relpos``. Listed before EVA, whose marker BEiT's
# checkpoints match too.
BEIT = Family(
    "beit", marker=r"blocks\.\d+\.attn\.relative_position_bias_table$",
    renames=EVA.renames, fused=(_QV_BIAS,),
)

# timm's VisionTransformerRelPos: the bias shared by every block is vitlab's position encoding
# (``relpos_mlp``); a per-block table sits in ``mhsa_relpos`` itself, not in a ``rel_pos`` module
# (the per-block MLP keeps timm's ``attn.rel_pos.mlp`` names)
RELPOS = Family(
    "relpos", marker=r"(blocks\.\d+\.attn\.rel_pos|shared_rel_pos)\.",
    renames=(("shared_rel_pos.{rest}", "pos_embed.rel_pos.{rest}"),
             ("blocks.{block}.attn.rel_pos.relative_position_bias_table",
              "blocks.{block}.attn.relative_position_bias_table")),
)

# timm's Cait: the class-attention blocks (``blocks_token_only``) follow the self-attention blocks in
# vitlab's numbering, the class token is the ``class_token`` transition's into stage 1, and the
# layer scales are bare parameters as EVA's. Listed before EVA, whose marker CaiT's checkpoints match.
CAIT = Family(
    "cait", marker=r"blocks_token_only\.",
    renames=(("cls_token", "transitions.1.cls_token"), *EVA.renames),
    appended="blocks_token_only",
)

# timm's NaFlexVit: one ``embeds`` module holds the patch projection and its norm, the class /
# register tokens and the position table(s) of ``naflex``, each kept in timm's own layout
NAFLEX = Family(
    "naflexvit", marker=r"embeds\.(proj|pos_embed|cls_token|reg_token)",
    renames=(("embeds.proj.{rest}", "patch_embed.proj.{rest}"), ("embeds.norm.{rest}", "patch_embed.norm.{rest}"),
             ("embeds.cls_token", "cls_token"), ("embeds.reg_token", "reg_token"),
             ("embeds.pos_embed", "pos_embed.weight"), ("embeds.pos_embed_y", "pos_embed.weight_y"),
             ("embeds.pos_embed_x", "pos_embed.weight_x")),
)

# timm's Xcit: bare layer scales ``gamma1..3`` (numbered as the official checkpoints), the class
# token as CaiT's, the class-attention blocks (``cls_attn_blocks``) numbered on after ``blocks``
XCIT = Family(
    "xcit", marker=r"(cls_attn_blocks\.|blocks\.\d+\.local_mp\.)",
    renames=(("cls_token", "transitions.1.cls_token"),
             ("blocks.{block}.gamma1", "blocks.{block}.ls1.gamma"),
             ("blocks.{block}.gamma2", "blocks.{block}.ls2.gamma"),
             ("blocks.{block}.gamma3", "blocks.{block}.ls3.gamma")),
    appended="cls_attn_blocks",
)


# timm's VisionTransformerSAM: the neck is the ``sam_neck`` pool's, the classifier ``head.fc``
# vitlab's ``head``, the decomposed tables keep timm's names (``attn.rel_pos_h`` / ``rel_pos_w``)
SAM = ImagePosFamily(
    "sam", marker=r"(neck\.|blocks\.\d+\.attn\.rel_pos_[hw]$)",
    renames=(("neck.{rest}", "pool.neck.{rest}"), ("head.fc.{rest}", "head.{rest}")),
)

# timm's ConVit: the class token, inserted after the GPSA blocks, is the ``class_token``
# transition's into stage 1; GPSA keeps timm's names (``attn.qk``, ``attn.v``, ``attn.pos_proj``)
CONVIT = Family(
    "convit", marker=r"blocks\.\d+\.attn\.(gating_param$|pos_proj\.)",
    renames=(("cls_token", "transitions.1.cls_token"),),
)

# vitlab's own names for what every family's timm model names as timm's ``VisionTransformer``
# does: a learned table is its module's ``weight``; the norm after pooling (``fc_norm``) and the
# attention pool are vitlab's ``pool`` (which of the two ``pool.norm`` is, the target's keys
# tell). Part of timm's own ViT names, so no entry of ``FAMILIES``: loading reads it forward for
# the keys its rules do not place (``weights``: position tables are resampled and their prefix rows
# moved there; a ``fc_norm`` after token pooling is a final norm when the pool has none), every
# export inverted (``export_state_dict``, ``to_timm.vit_state_dict``).
VITLAB = Family(
    "vitlab", marker=r"(?!)",
    renames=(("pos_embed", "pos_embed.weight"), ("fc_norm.{rest}", "pool.norm.{rest}"),
             ("attn_pool.{rest}", "pool.{rest}")),
)


# timm's ParallelScalingBlock and DiffParallelScalingBlock (timm's own ViT names, so no entry of
# ``FAMILIES``): one norm, one input projection [MLP fc1 | q k v], the attention's norms and lambdas
# in the block itself, the output projections apart or fused (over [attention | MLP] features, one
# bias). What names cannot say is code beside the readers: one layer scale serves both branches
# (``ls2`` equals ``ls1``), the fused output's bias serves either branch (summed on export), and an
# MLP bias one side has and the other lacks is zero (``weights._Plan._parallel``,
# ``to_timm._parallel_values``).
PARALLEL = SplitFamily(
    "parallel", marker=r"blocks\.\d+\.in_proj\.weight$",
    renames=(("blocks.{block}.in_norm.{rest}", "blocks.{block}.norm1.{rest}"),
             ("blocks.{block}.q_norm.{rest}", "blocks.{block}.attn.q_norm.{rest}"),
             ("blocks.{block}.k_norm.{rest}", "blocks.{block}.attn.k_norm.{rest}"),
             ("blocks.{block}.sub_norm.{rest}", "blocks.{block}.attn.sub_norm.{rest}"),  # differential
             ("blocks.{block}.lambda_{rest}", "blocks.{block}.attn.lambda_{rest}"),  # differential
             ("blocks.{block}.attn_out_proj.{rest}", "blocks.{block}.attn.proj.{rest}"),
             ("blocks.{block}.out_proj.bias", "blocks.{block}.attn.proj.bias"),  # the fused output's
             ("blocks.{block}.mlp_out_proj.{rest}", "blocks.{block}.mlp.fc2.{rest}"),
             ("blocks.{block}.mlp_bias", "blocks.{block}.mlp.fc1.bias"),  # no qkv bias: in_proj has no bias
             ("blocks.{block}.ls.gamma", "blocks.{block}.ls1.gamma")),
    split=(Split("blocks.{block}.in_proj.weight", ("blocks.{block}.mlp.fc1.weight", "blocks.{block}.attn.qkv.weight")),
           Split("blocks.{block}.in_proj.bias", ("blocks.{block}.mlp.fc1.bias", "blocks.{block}.attn.qkv.bias")),
           Split("blocks.{block}.out_proj.weight", ("blocks.{block}.attn.proj.weight", "blocks.{block}.mlp.fc2.weight"),
                 dim=1)),
)

# timm's SwiGLUPacked (``GluMlp``; DeepSeek's tower): one ``fc1``, the gate's rows first. Split on
# load into a model with vitlab's ``swiglu`` (``weights``)
SWIGLU_PACKED = SplitFamily(
    "swiglu_packed", marker=r"(?!)",
    split=(Split("blocks.{block}.mlp.fc1.weight", ("blocks.{block}.mlp.fc1_g.weight", "blocks.{block}.mlp.fc1_x.weight")),
           Split("blocks.{block}.mlp.fc1.bias", ("blocks.{block}.mlp.fc1_g.bias", "blocks.{block}.mlp.fc1_x.bias"))),
)


# timm's Eva with AttentionRope's separate q / k / v, each with its bias (Sapiens2; grouped-query in
# some blocks, so the parts differ in size). Listed before EVA, whose marker these checkpoints match.
EVA_KEY_BIAS = Family(
    "eva_key_bias", marker=r"blocks\.\d+\.attn\.k_proj\.bias$",
    renames=EVA.renames,
    fused=(
        EVA.fused[0],  # q / k / v weights
        Fuse("blocks.{block}.attn.qkv.bias", ("blocks.{block}.attn.q_proj.bias", "blocks.{block}.attn.k_proj.bias",
                                              "blocks.{block}.attn.v_proj.bias")),
    ),
)

# timm's VLM towers (``qwen3.py``, ``deepseek.py``, ``gemma4.py``): the classifier holds the encoder under ``encoder.``
# (its head stays ``head``); the native projector is vitlab's ``pool``. Each table lists the
# classifier's names before the encoder's: export picks those its target has.
_TOWER = (("head.{rest}", "head.{rest}"),)
QWEN3 = Family(
    "qwen3_vit", marker=r"(encoder\.)?merger\.|encoder\.pos_embed$",
    renames=(*_TOWER, ("encoder.merger.{rest}", "pool.{rest}"), ("merger.{rest}", "pool.{rest}"),
             ("encoder.pos_embed", "pos_embed.weight"), ("pos_embed", "pos_embed.weight"),
             ("encoder.{rest}", "{rest}")),
)
DEEPSEEK = Family(  # the packed SwiGLU ``mlp.fc1`` is split on load (``weights``), packed on export (``deepseek``)
    "deepseek_vit", marker=r"(encoder\.)?aligner\.|encoder\.norm\.weight$",
    renames=(*_TOWER, ("encoder.aligner.{rest}", "pool.{rest}"), ("aligner.{rest}", "pool.{rest}"),
             ("encoder.{rest}", "{rest}")),
)
GEMMA4 = Family(  # the per-axis position tables are ``rope_axes``'s, the standardisation ``cell_avg``'s
    "gemma4_vit", marker=r"(encoder\.)?patch_embed\.(input_proj|position_embedding_table)",
    renames=(*_TOWER, ("encoder.patch_embed.input_proj.{rest}", "patch_embed.proj.{rest}"),
             ("patch_embed.input_proj.{rest}", "patch_embed.proj.{rest}"),
             ("encoder.patch_embed.position_embedding_table", "pos_embed.axis_table"),
             ("patch_embed.position_embedding_table", "pos_embed.axis_table"),
             ("encoder.std_{rest}", "pool.std_{rest}"), ("std_{rest}", "pool.std_{rest}"),
             ("encoder.{rest}", "{rest}")),
)

FAMILIES: tuple[Family, ...] = (DEIT_DISTILLED, CAIT, XCIT, BEIT, RELPOS, EVA_KEY_BIAS, EVA, NAFLEX, SAM, CONVIT,
                                QWEN3, DEEPSEEK, GEMMA4)


def family_of(keys: Iterable[str]) -> Family | None:
    """The family whose checkpoints have these keys, ``None`` for timm's plain ViT names."""
    keys = list(keys)
    return next((f for f in FAMILIES if f.matches(keys)), None)


def export_state_dict(model, family: Family, target: Mapping[str, torch.Tensor],
                      inert_zero: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s weights for the timm model whose state dict is ``target`` (built on the meta
    device: only its names and shapes are read): ``VITLAB`` and then ``family`` read backwards
    into the target's keys (``Family.restore``), checked name by name and shape by shape.

    Raises:
        WeightsError: a weight has no place in the target, a target tensor gets none, a shape
            differs, or a part timm keeps at zero is non-zero (and not ``inert_zero``).
    """
    keys = set(target)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = family.restore(VITLAB.restore(sd, into=keys), into=target, inert_zero=inert_zero)
    problems = [f"no place in timm's {family.name} model for {k}" for k in sorted(set(out) - keys)]
    problems += [f"nothing for timm's {k}" for k in sorted(keys - set(out))]
    problems += [f"{k}: {tuple(out[k].shape)} for timm's {tuple(target[k].shape)}"
                 for k in sorted(keys & set(out)) if tuple(out[k].shape) != tuple(target[k].shape)]
    if problems:  # pragma: no cover - a component with weights the tables do not know
        raise WeightsError("; ".join(problems))
    return out
