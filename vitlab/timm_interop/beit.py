"""timm's ``Beit`` (BEiT, BEiT v2) <-> ``ViTSpec``.

A BEiT is a ViT with one class token whose attention keeps a learned relative position bias per
block (``mhsa_relpos``), fuses q / v biases with a key bias that is always zero (``q_bias``,
``v_bias``), and whose layer scales are bare ``gamma_1`` / ``gamma_2`` parameters. The state-dict
differences are the ``families.BEIT`` family table. The bias table is tied to the patch grid, so
the spec has ``dynamic_img_size: false``. Back to timm, a spec with ``mhsa_relpos`` and the class
token is a ``Beit`` (``BEIT_EXPORT``).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..errors import Problem, SpecError
from ..spec import ViTSpec
from .families import BEIT, export_state_dict
from .spec_from import _fmt_float, _Reader
from .to_timm import Export, _norm_layer, check_uniform_blocks


class BeitReader(_Reader):
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
        params = {"qkv_bias": a.q_bias is not None, "proj_bias": proj.bias is not None, "qk_norm": False,
                  "attn_drop": _fmt_float(a.attn_drop.p)}
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p,
                "name": "mhsa_relpos" if relpos else "mhsa"}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> dict:
        from timm.models.beit import Block as BeitBlock

        where = where or f"blocks.{i}"
        attn, mlp = self.parts(b, where, (BeitBlock,))
        init = None
        if b.gamma_1 is not None:
            # only the initial value of a trained scale; any positive value builds the same layer
            init = _fmt_float(b.init_values) if isinstance(b.init_values, (int, float)) and b.init_values > 0 else 1e-5
        block = {"name": "prenorm", "params": {"init_values": init}}
        return {"attn": attn, "mlp": mlp, "block": block, "drop_path": float(getattr(b.drop_path1, "drop_prob", 0.0))}

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
# What BEiT's descendants share with it (VisionTransformerRelPos, Eva): a conv patch embedding and
# one norm before the head, so their exports use these checks too.

def no_equivalent(spec: ViTSpec, timm_class: str, why: str) -> SpecError:
    """The error for a spec ``timm_class`` cannot express, naming the feature (``why``)."""
    return SpecError([Problem("", f"spec '{spec.name}' has no timm {timm_class} equivalent: {why}")])


def conv_patch_embed(spec: ViTSpec, fail, bias: bool = True) -> bool:
    """Refuse a patch embedding other than timm's ``PatchEmbed`` conv (kernel = stride = patch
    size, ``bias`` as the class builds it, no norm); returns whether it pads (``dynamic_img_pad``)."""
    pe = spec.patch_embed
    p = pe.params
    if pe.name != "conv":
        raise fail(f"patch embedding '{pe.name}' (timm's PatchEmbed convolution)")
    if p.get("stride") not in (None, *spec.patch_hw) or (p.get("stride") and spec.patch_hw[0] != spec.patch_hw[1]):
        raise fail(f"patch stride {p['stride']} other than the patch size")
    if p.get("norm"):
        raise fail("a norm after the patch embedding")
    if p.get("bias", True) != bias:
        raise fail(f"patch embedding {'without' if bias else 'with'} bias (here timm's has "
                   f"{'one' if bias else 'none'})")
    return bool(p.get("pad", False))


def check_plain_attention(spec: ViTSpec, fail, qk_norm: bool = True) -> None:
    """Refuse what the family's attention lacks: grouped-query heads, an output projection without
    bias, and (unless it has it) qk-norm."""
    ap = spec.attention.params
    if ap.get("kv_heads") not in (None, spec.num_heads):
        raise fail(f"grouped-query attention (kv_heads={ap['kv_heads']}; a key and value head per query head)")
    if not ap.get("proj_bias", True):
        raise fail("attention output projection without bias")
    if ap.get("qk_norm") and not qk_norm:
        raise fail("qk-norm")


def meta_state_dict(cls: type, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of ``cls(**kwargs)`` built on the meta device: the names and shapes an export fills."""
    return cls(**kwargs, device="meta").state_dict()


def common_kwargs(spec: ViTSpec) -> dict[str, Any]:
    """The arguments BEiT's descendants take alike: sizes, pooling, dropout rates and the norm."""
    return dict(
        img_size=spec.img_size if isinstance(spec.img_size, int) else tuple(spec.img_size),
        patch_size=spec.patch_size if isinstance(spec.patch_size, int) else tuple(spec.patch_size),
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
        global_pool={"none": ""}.get(spec.pool.name, spec.pool.name),
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        drop_rate=spec.drop_rate,
        proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=spec.attention.params.get("attn_drop", 0.0),
        drop_path_rate=spec.drop_path_rate,
        norm_layer=_norm_layer(spec),
    )


def fc_norm_of(spec: ViTSpec, fail) -> bool:
    """Whether the one norm before the head is timm's ``fc_norm`` (after pooling) rather than its
    ``norm`` (before): ``Beit`` and ``VisionTransformerRelPos`` build exactly one of the two."""
    pool = spec.pool
    if pool.name not in ("avg", "token", "none"):
        raise fail(f"pool '{pool.name}' (avg, token or none)")
    fc_norm = bool(pool.params.get("norm", False))
    if fc_norm == spec.final_norm:
        raise fail("a final norm and a norm after pooling together, or neither (timm norms the tokens once: "
                   "before pooling, final_norm, or after, the pool's norm)")
    return fc_norm


def _is_beit(spec: ViTSpec) -> bool:
    """A relative position table per block with the class token (Beit always has one) and an
    absolute table or none (a shared bias MLP is VisionTransformerRelPos', RoPE is Eva's)."""
    return (spec.stages is None and spec.attention.name == "mhsa_relpos" and spec.class_token
            and spec.pos_embed.name not in ("rope", "relpos_mlp"))


def beit_kwargs(spec: ViTSpec) -> dict[str, Any]:
    """Keyword arguments of timm's ``Beit`` (any ``beit*`` name) for a spec with a relative
    position table per block (``mhsa_relpos``) and the class token.

    Raises:
        SpecError: the spec uses something ``Beit`` cannot express (named).
    """
    fail = functools.partial(no_equivalent, spec, "Beit")
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
        common_kwargs(spec),
        qkv_bias=ap["qkv_bias"],
        swiglu_mlp=mlp.name == "swiglu",
        scale_mlp=bool(mlp.params.get("norm", False)),
        pos_drop_rate=spec.pos_drop_rate,
        init_values=block.params.get("init_values"),
        use_abs_pos_emb=pos.name == "learned",
        use_rel_pos_bias=True,
        use_shared_rel_pos_bias=False,
        use_fc_norm=fc_norm,
    )


def _beit_class(spec: ViTSpec) -> type:
    from timm.models.beit import Beit

    return Beit


def beit_state_dict(model) -> dict[str, torch.Tensor]:
    """A vitlab model's weights in timm Beit's names (``families.BEIT`` read backwards). Beit keeps no
    key bias; vitlab's is dropped whatever its value, as softmax ignores it here: without RoPE or
    qk-norm, ``q . (k + b) = q . k + q . b`` adds the same logit to every key of a query."""
    target = meta_state_dict(_beit_class(model.spec), beit_kwargs(model.spec))
    return export_state_dict(model, BEIT, target, inert_zero=True)


BEIT_EXPORT = Export(claims=_is_beit, timm_class=_beit_class, kwargs=beit_kwargs, state_dict=beit_state_dict)
