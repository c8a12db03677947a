"""timm's ``Beit`` (BEiT, BEiT v2) -> ``ViTSpec``.

A BEiT is a ViT with one class token whose attention keeps a learned relative position bias per
block (``mhsa_relpos``), fuses q / v biases with a key bias that is always zero (``q_bias``,
``v_bias``), and whose layer scales are bare ``gamma_1`` / ``gamma_2`` parameters. The state-dict
differences are the ``bridge.BEIT`` family table. The bias table is tied to the patch grid, so
the spec has ``dynamic_img_size: false``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..spec import ViTSpec
from .spec_from import _fmt_float, _Reader


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
        if type(b) is not BeitBlock:
            raise self.unsupported(f"block type {type(b).__module__}.{type(b).__name__} at {where}")
        attn = self.attention(b.attn, f"{where}.attn")
        mlp = self.mlp(b.mlp, f"{where}.mlp")
        self.norm(b.norm1, f"{where}.norm1")
        self.norm(b.norm2, f"{where}.norm2")
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
