"""timm's ``VisionTransformerRelPos`` (``vision_transformer_relpos``: ``vit_relpos_*``,
``vit_srelpos_*``) -> ``ViTSpec``.

A ViT without an absolute position table whose attention adds a relative position bias: from a
small MLP over log-spaced offsets (timm ``RelPosMlp``, ``cr`` mode) per block
(``mhsa_relpos_mlp``) or shared by every block (the position encoding ``relpos_mlp``), or from a
table (``RelPosBias``: ``mhsa_relpos``). The state-dict differences are the ``bridge.RELPOS``
family table.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..spec import ViTSpec
from .spec_from import _fmt_float, _Reader


class RelPosReader(_Reader):
    """Reads a timm ``VisionTransformerRelPos`` instance (its modules and shapes, never its name)."""

    def rel_pos(self, r: nn.Module, heads: int, where: str) -> tuple[str, dict]:
        """The bias module: ``("mlp", {"hidden": h})`` or ``("table", {})``."""
        from timm.layers import Mlp
        from timm.layers.pos_embed_rel import RelPosBias, RelPosMlp

        m, t = self.m, type(r)
        if tuple(r.window_size) != tuple(m.patch_embed.grid_size):
            raise self.unsupported(f"relative position window {tuple(r.window_size)} other than the patch grid "
                                   f"at {where}")
        if r.prefix_tokens != m.num_prefix_tokens:
            raise self.unsupported(f"relative position bias over {r.prefix_tokens} prefix tokens at {where}")
        if t is RelPosBias:
            return "table", {}
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
        return "mlp", {"hidden": fc1.out_features}

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.models.vision_transformer_relpos import RelPosAttention

        if type(a) is not RelPosAttention:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        D = self.m.embed_dim
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if a.num_heads * a.head_dim != D or qkv.out_features != 3 * D:
            raise self.unsupported(f"attention width other than embed_dim {D} at {where}")
        qk_norm = not self.is_id(a.q_norm)
        if qk_norm:
            self.norm(a.q_norm, f"{where}.q_norm")
            self.norm(a.k_norm, f"{where}.k_norm")
        params = {"qkv_bias": qkv.bias is not None, "proj_bias": proj.bias is not None, "qk_norm": qk_norm,
                  "attn_drop": _fmt_float(a.attn_drop.p)}
        name = "mhsa"
        if a.rel_pos is not None:
            kind, extra = self.rel_pos(a.rel_pos, a.num_heads, f"{where}.rel_pos")
            name = "mhsa_relpos" if kind == "table" else "mhsa_relpos_mlp"
            if kind == "mlp":
                params["bias_hidden"] = extra["hidden"]
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p, "name": name}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> dict:
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
            kind, extra = self.rel_pos(m.shared_rel_pos, blocks[0]["attn"]["heads"], "shared_rel_pos")
            if kind != "mlp":
                raise self.unsupported("relative position table shared by all blocks (shared_rel_pos with "
                                       "rel_pos_type 'bias')")
            data["pos_embed"] = {"name": "relpos_mlp", "params": {"hidden": extra["hidden"]}}
        self.final_norm_and_pool(data)
        data["dynamic_img_size"] = False  # timm's model takes its one image size
        return self.finish(data, blocks)
