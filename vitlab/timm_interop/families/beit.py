"""timm's ``Beit`` (BEiT, BEiT v2) <-> ``ViTSpec``.

A BEiT is a ViT with one class token whose attention keeps a learned relative position bias per
block (``mhsa_relpos``), fuses q / v biases with a key bias that is always zero (``q_bias``,
``v_bias``), and whose layer scales are bare ``gamma_1`` / ``gamma_2`` parameters. The state-dict
differences are the ``BEIT`` family table. The bias table is tied to the patch grid, so
the spec has ``dynamic_img_size: false``. Back to timm, a spec with ``mhsa_relpos`` and the class
token is a ``Beit`` (``FAMILY``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import ZERO, Family, Fuse
from ..export import (
    check_plain_attention, check_uniform_blocks, common_kwargs, conv_patch_embed, fc_norm_of, refuser,
    written_back,
)
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, Reader, fmt_float
from .eva import EVA

# timm's Beit: EVA's layer scales and fused q / v bias (zero key bias); each block's relative
# position table keeps timm's name in ``mhsa_relpos``. Before EVA in the families, whose marker
# BEiT's checkpoints match too.
BEIT = Family(
    "beit", marker=r"blocks\.\d+\.attn\.relative_position_bias_table$",
    renames=EVA.renames, fused=(Fuse("blocks.{block}.attn.qkv.bias",
                                     ("blocks.{block}.attn.q_bias", ZERO, "blocks.{block}.attn.v_bias")),),
)


class OneNormReader(Reader):
    """What BEiT's descendants (``Beit``, ``VisionTransformerRelPos``) read alike: no ``norm_pre``
    and one norm before the head, timm's ``norm`` or its ``fc_norm``."""

    def final_norm_and_pool(self, data: dict[str, Any]) -> None:
        """The final norm and pool of a model with only ``''`` / ``avg`` / ``token`` pooling, a
        ``norm`` before and an ``fc_norm`` after it, and no ``norm_pre`` (BEiT, relpos) into ``data``."""
        m = self.m
        data["pre_norm"] = False
        final, fc_norm = not self.is_id(m.norm), not self.is_id(m.fc_norm)
        if final:
            self.norm(m.norm, "norm")
        if fc_norm:
            self.norm(m.fc_norm, "fc_norm")
        gp = m.global_pool
        if gp == "avg":  # over the patches only, then fc_norm
            data["pool"] = {"name": "avg", "params": {"norm": fc_norm}}
            data["final_norm"] = final
        elif gp in ("token", ""):
            if final and fc_norm:
                raise self.unsupported("both a final norm and fc_norm after token pooling")
            # a per-token norm commutes with taking tokens: fc_norm here is a final norm
            data["pool"] = {"name": "token" if gp == "token" else "none"}
            data["final_norm"] = final or fc_norm
        else:
            raise self.unsupported(f"global_pool '{gp}'")


class BeitReader(OneNormReader):
    """Reads a timm ``Beit`` instance (its modules and shapes, never its name)."""

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.models.beit import Attention as BeitAttention

        if type(a) is not BeitAttention:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        D = self.m.embed_dim
        qkv = self.linear(a.qkv, f"{where}.qkv")
        if qkv.out_features != 3 * D:
            raise self.unsupported(f"attention width {qkv.out_features // 3} != embed_dim {D} (attn_head_dim) "
                                   f"at {where}")
        if qkv.bias is not None:  # timm never builds it; q / v biases live in q_bias / v_bias
            raise self.unsupported(f"bias on the qkv projection itself at {where}")
        proj = self.linear(a.proj, f"{where}.proj")
        relpos = a.relative_position_bias_table is not None
        if relpos and tuple(a.window_size) != tuple(self.m.patch_embed.grid_size):
            raise self.unsupported(f"relative position window {tuple(a.window_size)} other than the patch grid "
                                   f"at {where}")
        params = {"qkv_bias": "qv" if a.q_bias is not None else False,  # timm's key bias: a zero buffer
                  "proj_bias": proj.bias is not None, "qk_norm": False,
                  "attn_drop": fmt_float(a.attn_drop.p)}
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p,
                "name": "mhsa_relpos" if relpos else "mhsa"}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        from timm.models.beit import Block as BeitBlock

        where = where or f"blocks.{i}"
        attn, mlp = self.parts(b, where, (BeitBlock,))
        init = None
        if b.gamma_1 is not None:
            # only the initial value of a trained scale; any positive value builds the same layer
            init = fmt_float(b.init_values) if isinstance(b.init_values, (int, float)) and b.init_values > 0 else 1e-5
        block = {"name": "prenorm", "params": {"init_values": init}}
        return BlockRead(attn, mlp, block, float(getattr(b.drop_path1, "drop_prob", 0.0)))

    def spec(self) -> ViTSpec:
        from timm.models.beit import Beit

        m = self.m
        if type(m) is not Beit:
            raise self.unsupported(f"Beit subclass {type(m).__name__}")
        if m.rel_pos_bias is not None:
            raise self.unsupported("relative position bias shared by all blocks (use_shared_rel_pos_bias)")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        blocks = self.head_and_blocks(data)
        data["class_token"], data["reg_tokens"] = True, 0  # Beit always leads with one class token

        grid = m.patch_embed.grid_size
        if m.pos_embed is None:
            data["pos_embed"] = {"name": "none"}
        else:
            if tuple(m.pos_embed.shape) != (1, grid[0] * grid[1] + 1, m.embed_dim):
                raise self.unsupported(f"position embedding of shape {tuple(m.pos_embed.shape)}")
            data["pos_embed"] = {"name": "learned", "params": {"include_prefix": True}}

        self.final_norm_and_pool(data)
        data["dynamic_img_size"] = False  # the relative position table is tied to the patch grid
        return self.finish(data, blocks)


# --- spec -> timm --------------------------------------------------------------------------------

def _is_beit(spec: ViTSpec) -> bool:
    """A relative position table per block with the class token (Beit always has one) and an
    absolute table or none (a shared bias MLP is VisionTransformerRelPos', RoPE is Eva's)."""
    return (spec.stages is None and spec.attention.name == "mhsa_relpos" and spec.class_token
            and spec.pos_embed.name not in ("rope", "relpos_mlp"))


def beit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Beit`` (any ``beit*`` name) for a spec with a relative
    position table per block (``mhsa_relpos``) and the class token.

    Raises:
        SpecError: the spec uses something ``Beit`` cannot express (named).
    """
    fail = refuser(spec, "Beit")
    check_uniform_blocks(spec, fail)
    attn, mlp, block, pos = spec.attention, spec.mlp, spec.block, spec.pos_embed
    ap = attn.params
    if attn.name != "mhsa_relpos":
        raise fail(f"attention '{attn.name}' (Beit: mhsa_relpos)")
    check_plain_attention(spec, fail, qk_norm=False)
    if mlp.name not in ("mlp", "swiglu") or not mlp.params.get("bias", True) or mlp.params.get("act", "gelu") != "gelu":
        raise fail(f"mlp '{mlp.name}' with {mlp.params} (Beit: GELU MLP or SwiGLU, with biases)")
    if block.name != "prenorm" or block.params.get("attn_only_layer_scale"):
        raise fail(f"block '{block.name}' {block.params} (Beit: pre-norm, layer scale on both branches or none)")
    if spec.norm.name not in ("layernorm", "rmsnorm"):
        raise fail(f"norm '{spec.norm.name}'")
    if conv_patch_embed(spec, fail):
        raise fail("padding images to whole patches (dynamic_img_pad)")
    if not spec.class_token or spec.reg_tokens:
        raise fail("prefix tokens other than the class token (Beit always has one, and only it)")
    if pos.name not in ("learned", "none") or not pos.params.get("include_prefix", True):
        raise fail(f"position encoding '{pos.name}' {pos.params} (Beit: a learned table with the class token's "
                   "row, or none)")
    if spec.pre_norm or spec.dynamic_img_size:
        raise fail("pre_norm or dynamic_img_size")
    fc_norm = fc_norm_of(spec, fail)
    return dict(
        common_kwargs(spec, fail),
        qkv_bias=bool(ap["qkv_bias"]),  # q / v biases, the key's zero (qv; true: vitlab's inert key bias dropped)
        swiglu_mlp=mlp.name == "swiglu",
        scale_mlp=bool(mlp.params.get("norm", False)),
        pos_drop_rate=spec.pos_drop_rate,
        init_values=block.params.get("init_values"),
        use_abs_pos_emb=pos.name == "learned",
        use_rel_pos_bias=True,
        use_shared_rel_pos_bias=False,
        use_fc_norm=fc_norm,
    )


def beit_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A vitlab model's weights in timm Beit's names (``BEIT`` read backwards). Beit keeps no
    key bias; vitlab's is dropped whatever its value, as softmax ignores it here: without RoPE or
    qk-norm, ``q . (k + b) = q . k + q . b`` adds the same logit to every key of a query."""
    return written_back(model, ex, BEIT, inert_zero=True)


FAMILY = TimmFamily(
    "beit", classes=("timm.models.beit.Beit",), reader=BeitReader,
    claims=_is_beit, timm_class="timm.models.beit.Beit", kwargs=beit_kwargs, state_dict=beit_state_dict, tables=(BEIT,),
)
