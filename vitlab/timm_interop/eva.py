"""timm's ``Eva`` (EVA, EVA-02, DINOv3, Perception Encoder, ``vit_*_rope_*``) -> ``ViTSpec``.

An Eva is a ViT whose attention may rotate queries and keys (``rope``), keep q / k / v apart
(``q_proj`` ...) or fuse them with EVA's bias-free key (``q_bias``, ``v_bias``), norm its heads'
output (``mhsa_subln``), and whose layer scales are bare ``gamma_1`` / ``gamma_2`` parameters. The
state-dict differences are the ``bridge.EVA`` family table.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..spec import ViTSpec
from .spec_from import _fmt_float, _Reader

class EvaReader(_Reader):
    """Reads a timm ``Eva`` instance (its modules and shapes, never its name)."""

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention

        t = type(a)
        if t not in (EvaAttention, AttentionRope):
            raise self.unsupported(f"attention layer {t.__name__} at {where}")
        D = self.m.embed_dim
        if a.num_heads * a.head_dim != D:
            raise self.unsupported(f"attention width {a.num_heads * a.head_dim} != embed_dim {D} (attn_head_dim) "
                                   f"at {where}")
        if getattr(a, "gate", None) is not None:
            raise self.unsupported(f"gated attention output at {where}")
        kv_heads = getattr(a, "num_kv_heads", a.num_heads)
        if a.qkv is not None:
            self.linear(a.qkv, f"{where}.qkv")
            if t is EvaAttention:
                qkv_bias = a.q_bias is not None
            else:
                qkv_bias = a.qkv.bias is not None
        else:
            q, k, v = (self.linear(getattr(a, n), f"{where}.{n}") for n in ("q_proj", "k_proj", "v_proj"))
            qkv_bias = q.bias is not None
            k_bias = k.bias is not None if t is AttentionRope else qkv_bias  # EVA: zero key bias
            if (v.bias is not None) != qkv_bias or k_bias != qkv_bias:
                raise self.unsupported(f"bias on only some of q / k / v at {where}")
            if kv_heads != a.num_heads:
                raise self.unsupported(f"grouped-query attention with separate projections at {where}")
        proj = self.linear(a.proj, f"{where}.proj")
        qk_norm = not self.is_id(a.q_norm)
        if qk_norm:
            self.norm(a.q_norm, f"{where}.q_norm")
            self.norm(a.k_norm, f"{where}.k_norm")
        subln = not self.is_id(a.norm)
        if subln:
            self.norm(a.norm, f"{where}.norm")
        if a.num_prefix_tokens != self.m.num_prefix_tokens:
            raise self.unsupported(f"RoPE skipping {a.num_prefix_tokens} tokens, not the prefix, at {where}")
        params = {"qkv_bias": qkv_bias, "proj_bias": proj.bias is not None, "qk_norm": qk_norm,
                  "attn_drop": _fmt_float(a.attn_drop.p)}
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p,
                "name": "mhsa_subln" if subln else "mhsa", "rotate_half": bool(getattr(a, "rotate_half", False))}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> dict:
        from timm.models.eva import EvaBlock, EvaBlockPostNorm

        where = where or f"blocks.{i}"
        t = type(b)
        if t not in (EvaBlock, EvaBlockPostNorm):
            raise self.unsupported(f"block type {t.__module__}.{t.__name__} at {where}")
        attn = self.attention(b.attn, f"{where}.attn")
        mlp = self.mlp(b.mlp, f"{where}.mlp")
        self.norm(b.norm1, f"{where}.norm1")
        self.norm(b.norm2, f"{where}.norm2")
        if t is EvaBlock:
            g1, g2 = b.gamma_1, b.gamma_2
            if (g1 is None) != (g2 is None):
                raise self.unsupported(f"layer scale on the attention branch only (attn_only_layer_scale) at {where}")
            init = b.init_values if isinstance(b.init_values, (int, float)) and b.init_values > 0 else 1e-5
            block = {"name": "prenorm", "params": {"init_values": None if g1 is None else _fmt_float(init)}}
        else:
            block = {"name": "respostnorm", "params": {"init_values": None}}
        return {"attn": attn, "mlp": mlp, "block": block, "drop_path": float(getattr(b.drop_path1, "drop_prob", 0.0))}

    def rope(self, rotate_half: bool) -> dict | None:
        from timm.layers import RotaryEmbeddingCat, RotaryEmbeddingDinoV3

        r = self.m.rope
        if r is None:
            return None
        t = type(r)
        if t is RotaryEmbeddingCat:
            if r.in_pixels or r.grid_type != "index" or r.aug_active:
                raise self.unsupported("RoPE in pixel units or with coordinate augmentation (RotaryEmbeddingCat)")
            ref = r.ref_feat_shape
            params = {"variant": "axial", "temperature": float(r.temperature), "grid_offset": float(r.grid_offset),
                      "grid_indexing": r.grid_indexing, "ref_grid": None if ref is None else [int(x) for x in ref]}
        elif t is RotaryEmbeddingDinoV3:
            params = {"variant": "dinov3", "temperature": float(r.temperature) if r.temperature is not None else 100.0,
                      "min_period": r.min_period, "max_period": r.max_period, "grid_offset": float(r.grid_offset),
                      "grid_indexing": r.grid_indexing, "normalize_coords": r.normalize_coords,
                      "shift_coords": r.shift_coords, "jitter_coords": r.jitter_coords,
                      "rescale_coords": r.rescale_coords}
        else:
            raise self.unsupported(f"rotary embedding {t.__name__}"
                                   + (" (learned per-block frequencies)" if t.__name__ == "RotaryEmbeddingMixed" else ""))
        if bool(r.rotate_half) != rotate_half:
            raise self.unsupported("RoPE whose attention pairs channels differently from its table")
        if r.dim != self.m.embed_dim // self.m.blocks[0].attn.num_heads:
            raise self.unsupported(f"RoPE over {r.dim} of the head's channels")
        return {**params, "rotate_half": rotate_half}

    def pool_include_prefix(self) -> bool:
        return self.m.attn_pool is not None  # Eva's attention pool reads every token; its avg pool skips the prefix

    def pool(self, heads: int, hidden: int) -> tuple[dict, bool]:
        m = self.m
        if m.global_pool == "map" or m.global_pool in ("avg", "token", ""):
            return super().pool(heads, hidden)
        raise self.unsupported(f"global_pool '{m.global_pool}'")

    def spec(self) -> ViTSpec:
        from timm.models.eva import Eva

        m = self.m
        if type(m) is not Eva:
            raise self.unsupported(f"Eva subclass {type(m).__name__}")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        D = m.embed_dim
        data["num_classes"] = self.num_classes(D)
        if m.patch_drop is not None:
            raise self.unsupported("patch dropout (patch_drop_rate)")
        if not len(m.blocks):
            raise self.unsupported("model without blocks")
        blocks = [self.block(b, i) for i, b in enumerate(m.blocks)]
        first = blocks[0]
        strip = lambda b: {k: v for k, v in b.items() if k != "drop_path"}  # noqa: E731
        for i, b in enumerate(blocks[1:], start=1):
            if strip(b) != strip(first):
                raise self.unsupported(f"blocks that differ (block {i} is not configured like block 0)")
        heads, hidden = first["attn"]["heads"], first["mlp"]["hidden"]
        data.update(embed_dim=D, depth=len(blocks), num_heads=heads, mlp_ratio=self.mlp_ratio(hidden, "blocks.0.mlp"))
        data["class_token"] = m.cls_token is not None
        data["reg_tokens"] = 0 if m.reg_token is None else int(m.reg_token.shape[1])
        if m.num_prefix_tokens != int(data["class_token"]) + data["reg_tokens"]:
            raise self.unsupported("prefix tokens other than one class token and register tokens")

        grid = m.patch_embed.grid_size
        learned = m.pos_embed is not None
        include_prefix = not m.no_embed_class
        if learned:
            expected = grid[0] * grid[1] + (m.num_prefix_tokens if include_prefix else 0)
            if tuple(m.pos_embed.shape) != (1, expected, D):
                raise self.unsupported(f"position embedding of shape {tuple(m.pos_embed.shape)}")
        rope = self.rope(first["attn"]["rotate_half"])
        if rope is not None:
            data["pos_embed"] = {"name": "rope", "params": {**rope, "learned": learned, "include_prefix": include_prefix}}
        elif learned:
            data["pos_embed"] = {"name": "learned", "params": {"include_prefix": include_prefix}}
        else:
            data["pos_embed"] = {"name": "none"}

        pool, final, fc_as_final = self.norms_and_pool(data, heads, hidden)
        if final and fc_as_final:
            raise self.unsupported("both a final norm and fc_norm after token pooling")
        data["final_norm"] = final or fc_as_final
        data["pool"] = pool
        data["dynamic_img_size"] = bool(m.dynamic_img_size)
        kv = getattr(m.blocks[0].attn, "num_kv_heads", heads)
        if kv != heads:
            data["attention_extra"] = {"kv_heads": kv}
        return self.finish(data, blocks)
