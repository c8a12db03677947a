"""timm's Gemma 4 vision tower (``gemma4_vit``: ``Gemma4VitEncoder`` / ``Gemma4VitClassifier``)
<-> ``ViTSpec``.

A linear patch embedding of [0, 1] pixels mapped to [-1, 1] inside it (``linear_pixnorm``), learned
per-axis position tables and RoPE rotating each axis's half of the head (``rope_axes``), sandwich
blocks (``sandwich``) of RMS norms, attention with normed queries, keys and values and separate
projections (``mhsa_qkvnorm``) and a GELU-tanh gated MLP (``glu``), every projection clamped in the
E2B/E4B tower; no final norm. The native pool averages 3 x 3 cells (``cell_avg``); the classifier
averages the tokens and norms them without weights (``avg_std``). See ``vlm.py`` for what the VLM
towers share; the state-dict differences are ``GEMMA4``.

timm's Gemma 4 takes any image size and keeps none: the spec's ``img_size`` is the model's
``pretrained_cfg`` input size, else timm's default (768).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import refuser, written_back
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, fmt_float
from .vlm import TOWER, TowerReader, common_kwargs, pool_kwargs, require

# timm's Gemma 4 tower: the per-axis position tables are ``rope_axes``'s, the standardisation
# ``cell_avg``'s
GEMMA4 = Family(
    "gemma4_vit", marker=r"(encoder\.)?patch_embed\.(input_proj|position_embedding_table)",
    renames=(*TOWER, ("encoder.patch_embed.input_proj.{rest}", "patch_embed.proj.{rest}"),
             ("patch_embed.input_proj.{rest}", "patch_embed.proj.{rest}"),
             ("encoder.patch_embed.position_embedding_table", "pos_embed.axis_table"),
             ("patch_embed.position_embedding_table", "pos_embed.axis_table"),
             ("encoder.std_{rest}", "pool.std_{rest}"), ("std_{rest}", "pool.std_{rest}"),
             ("encoder.{rest}", "{rest}")),
)


class GemmaReader(TowerReader):
    """Reads timm's ``Gemma4VitEncoder`` / ``Gemma4VitClassifier`` (modules and shapes, never names)."""

    def clamped(self, mod: nn.Module, where: str, shape: tuple[int, int]) -> bool:
        """A ``Gemma4ClippableLinear`` of ``(in, out)`` features without bias: whether it clamps."""
        from timm.models.gemma4_vit import Gemma4ClippableLinear

        if type(mod) is not Gemma4ClippableLinear:
            raise self.unsupported(f"projection {type(mod).__name__} at {where}")
        lin = self.linear(mod.linear, f"{where}.linear")
        if lin.bias is not None or (lin.in_features, lin.out_features) != shape:
            raise self.unsupported(f"projection with a bias or of another shape at {where}")
        return bool(mod.use_clipped)

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.layers import RmsNorm
        from timm.models.gemma4_vit import Gemma4Attention

        if type(a) is not Gemma4Attention:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        D, h, kv, hd = self.m.embed_dim, a.num_heads, a.num_kv_heads, a.head_dim
        if h * hd != D:
            raise self.unsupported(f"attention width {h * hd} != embed_dim {D} (head_dim {hd}) at {where}")
        clamps = {self.clamped(a.q_proj, f"{where}.q_proj", (D, D)), self.clamped(a.o_proj, f"{where}.o_proj", (D, D)),
                  self.clamped(a.k_proj, f"{where}.k_proj", (D, kv * hd)),
                  self.clamped(a.v_proj, f"{where}.v_proj", (D, kv * hd))}
        if len(clamps) != 1:
            raise self.unsupported(f"clamps on only some projections at {where}")
        self.norm(a.q_norm, f"{where}.q_norm")
        self.norm(a.k_norm, f"{where}.k_norm")
        v = a.v_norm
        if type(v) is not RmsNorm or v.elementwise_affine:
            raise self.unsupported(f"value norm other than an RmsNorm without weights at {where}")
        params = {"v_norm": True, "eps": fmt_float(v.eps), "scale": 1.0, "kv_heads": None if kv == h else kv,
                  "clamp": clamps.pop(), "attn_drop": fmt_float(a.attn_drop.p)}
        return {"name": "mhsa_qkvnorm", "heads": h, "params": params, "proj_drop": a.proj_drop.p}

    def gated_mlp(self, mlp: nn.Module, where: str) -> dict:
        from timm.models.gemma4_vit import Gemma4GatedMlp

        if type(mlp) is not Gemma4GatedMlp:
            raise self.unsupported(f"MLP layer {type(mlp).__name__} at {where}")
        D, hidden = self.m.embed_dim, mlp.gate_proj.linear.out_features
        clamps = {self.clamped(mlp.gate_proj, f"{where}.gate_proj", (D, hidden)),
                  self.clamped(mlp.up_proj, f"{where}.up_proj", (D, hidden)),
                  self.clamped(mlp.down_proj, f"{where}.down_proj", (hidden, D))}
        if len(clamps) != 1:
            raise self.unsupported(f"clamps on only some projections at {where}")
        params = {"act": self.act(mlp.act, f"{where}.act"), "clamp": clamps.pop()}
        return {"name": "glu", "params": params, "hidden": hidden}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        from timm.models.gemma4_vit import Gemma4Block

        where = f"blocks.{i}"
        if type(b) is not Gemma4Block:
            raise self.unsupported(f"block type {type(b).__name__} at {where}")
        for n in ("norm1", "norm2", "norm3", "norm4"):
            self.norm(getattr(b, n), f"{where}.{n}")
        block = {"name": "sandwich", "params": {"init_values": None}}
        return BlockRead(self.attention(b.attn, f"{where}.attn"), self.gated_mlp(b.mlp, f"{where}.mlp"), block,
                         float(getattr(b.drop_path, "drop_prob", 0.0)))

    def image_size(self) -> tuple[int, int]:
        """The spec's image size: timm's Gemma 4 takes any and keeps none."""
        model = self.wrapper if self.wrapper is not None else self.m
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if size:
            return int(size[-2]), int(size[-1])
        default = inspect.signature(type(model)).parameters["img_size"].default
        return (default, default) if isinstance(default, int) else tuple(default)

    def patch_embed(self) -> dict:
        from timm.models.gemma4_vit import Gemma4PatchEmbed

        pe, D = self.m.patch_embed, self.m.embed_dim
        if type(pe) is not Gemma4PatchEmbed:
            raise self.unsupported(f"patch embedding {type(pe).__name__}")
        ph, pw = pe.patch_size
        proj = self.linear(pe.input_proj, "patch_embed.input_proj")
        if proj.out_features != D or proj.in_features % (ph * pw) or proj.bias is not None:
            raise self.unsupported("patch projection with a bias or of another shape")
        h, w = self.image_size()
        return {"img_size": [h, w] if h != w else h, "patch_size": [ph, pw] if ph != pw else ph,
                "in_chans": proj.in_features // (ph * pw),
                "patch_embed": {"name": "linear_pixnorm", "params": {"bias": False, "pixel_mean": 0.5,
                                                                     "pixel_std": 0.5}}}

    def positions(self) -> dict:
        from timm.models.gemma4_vit import Gemma4RotaryEmbedding2D

        r, m = self.m.rotary_emb, self.m
        table = m.patch_embed.position_embedding_table
        if type(r) is not Gemma4RotaryEmbedding2D or r.head_dim != m.embed_dim // m.blocks[0].attn.num_heads:
            raise self.unsupported("rotary embedding other than Gemma's 2-D one over the whole head")
        if table.ndim != 3 or table.shape[0] != 2 or table.shape[2] != m.embed_dim:
            raise self.unsupported(f"position table of shape {tuple(table.shape)}")
        return {"name": "rope_axes", "params": {"temperature": float(r.rope_theta), "rotate_half": True,
                                                "grid_indexing": "xy", "axis_table": int(table.shape[1])}}

    def projector(self) -> dict | None:
        m = self.m
        if m.global_pool != "soft":
            return None
        if m.pooler.root_hidden_size != m.embed_dim ** 0.5:
            raise self.unsupported("soft-token pool scaled other than by sqrt(embed_dim)")
        return {"name": "cell_avg", "params": {"kernel": m.pooler.pooling_kernel_size,
                                               "standardize": m.std_bias is not None}}

    def spec(self) -> ViTSpec:
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        if not len(self.m.blocks):
            raise self.unsupported("model without blocks")
        blocks = [self.block(b, i) for i, b in enumerate(self.m.blocks)]
        data.update(pos_embed=self.positions(), final_norm=False)
        return self.finish(data, blocks)


# --- spec -> timm --------------------------------------------------------------------------------

def _no_merge(fail, params: dict) -> dict:
    raise fail("a pixel-unshuffle projector (Gemma 4's pool averages its cells: cell_avg)")


def gemma_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Gemma4VitClassifier`` for ``spec``."""
    from timm.layers import get_act_layer

    fail = refuser(spec, "Gemma4VitClassifier")
    require(spec, ex, fail, {
        "patch_embed": ("linear_pixnorm", {"bias": False, "pixel_mean": 0.5, "pixel_std": 0.5}),
        "pos_embed": ("rope_axes", {"rotate_half": True, "grid_indexing": "xy"}),
        "attention": ("mhsa_qkvnorm", {"v_norm": True, "scale": 1.0}),
        "mlp": ("glu", {}),
        "norm": ("rmsnorm", {}),
        "block": ("sandwich", {}),
    }, free={"pos_embed": ("temperature", "axis_table"), "attention": ("eps", "kv_heads", "clamp", "attn_drop"),
             "mlp": ("act", "clamp"), "norm": ("eps",)})
    ap, pool = spec.attention.params, spec.pool
    eps = spec.norm.params["eps"]
    if spec.final_norm or ap["eps"] != eps or ap["clamp"] != spec.mlp.params["clamp"]:
        raise fail("a final norm, a value norm of another eps, or clamps in attention or MLP only")
    if spec.pos_embed.params["axis_table"] is None:
        raise fail("RoPE without the per-axis position tables")
    if pool.name == "cell_avg":  # the encoder's soft tokens, each to the head
        soft = dict(global_pool="", encoder_pool="soft", final_norm=False, pooling_kernel_size=pool.params["kernel"],
                    standardize=pool.params["standardize"])
    else:
        soft = pool_kwargs(spec, fail, "soft", eps, "rmsnorm", functools.partial(_no_merge, fail))
    return dict(
        common_kwargs(spec), head_dim=spec.embed_dim // spec.num_heads, num_kv_heads=ap["kv_heads"],
        intermediate_size=spec.mlp_hidden_dim, norm_eps=eps, rope_theta=spec.pos_embed.params["temperature"],
        position_embedding_size=spec.pos_embed.params["axis_table"], use_clipped_linears=ap["clamp"],
        act_layer=get_act_layer(spec.mlp.params["act"]), **soft)


FAMILY = TimmFamily(
    "gemma4_vit", reader=GemmaReader,
    classes=("timm.models.gemma4_vit.Gemma4VitClassifier", "timm.models.gemma4_vit.Gemma4VitEncoder"),
    claims=lambda spec: spec.attention.name == "mhsa_qkvnorm" or spec.pos_embed.name == "rope_axes",
    timm_class="timm.models.gemma4_vit.Gemma4VitClassifier", kwargs=gemma_kwargs,
    state_dict=functools.partial(written_back, table=GEMMA4), tables=(GEMMA4,),
)
