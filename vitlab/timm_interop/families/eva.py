"""timm's ``Eva`` (EVA, EVA-02, DINOv3, Perception Encoder, ``vit_*_rope_*`` and RoPE-Mixed,
Sapiens2) -> ``ViTSpec``.

An Eva is a ViT whose attention may rotate queries and keys (``rope``, RoPE-Mixed's per block),
keep q / k / v apart (``q_proj`` ...) or fuse them with EVA's bias-free key (``q_bias``, ``v_bias``),
norm its heads' output (``mhsa_subln``), and whose layer scales are bare ``gamma_1`` / ``gamma_2``
parameters (Sapiens2: ``gamma_1`` only). Blocks may differ in their key / value heads (Sapiens2's
grouped-query middle blocks): the spec's ``layers``. The state-dict differences are the
``EVA`` family table (``EVA_KEY_BIAS`` with a key bias).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import ZERO, Family, Fuse
from ..export import common_kwargs, conv_patch_embed, refuser, written_back
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, Reader, fmt_float

# timm's Eva: bare layer-scale parameters; q / k / v kept apart, or fused with the zero key bias
# (EVA's and BEiT's fused qkv: q and v biases stored, the key bias a zero buffer outside the state dict)
_RENAMES = (("blocks.{block}.gamma_1", "blocks.{block}.ls1.gamma"),
            ("blocks.{block}.gamma_2", "blocks.{block}.ls2.gamma"),
            ("rope.freqs", "pos_embed.freqs"))  # RoPE-Mixed's learned per-block frequencies
# a ``qkv_bias: qv`` projection's trained biases are timm's as they are: fused q_bias / v_bias, or the
# q / v projections' apart (on import the fused entries take them first, and the loader splits those)
QV_RENAMES = (("blocks.{block}.attn.q_bias", "blocks.{block}.attn.qkv.q_bias"),
              ("blocks.{block}.attn.v_bias", "blocks.{block}.attn.qkv.v_bias"),
              ("blocks.{block}.attn.q_proj.bias", "blocks.{block}.attn.qkv.q_bias"),
              ("blocks.{block}.attn.v_proj.bias", "blocks.{block}.attn.qkv.v_bias"))
EVA = Family(
    "eva", marker=r"(blocks\.\d+\.(gamma_[12]|attn\.(q_bias|v_bias|q_proj\.weight))|rope\.freqs)$",
    renames=_RENAMES + QV_RENAMES,
    fused=(
        Fuse("blocks.{block}.attn.qkv.weight", ("blocks.{block}.attn.q_proj.weight", "blocks.{block}.attn.k_proj.weight",
                                                "blocks.{block}.attn.v_proj.weight")),
        Fuse("blocks.{block}.attn.qkv.bias", ("blocks.{block}.attn.q_proj.bias", ZERO, "blocks.{block}.attn.v_proj.bias")),
        Fuse("blocks.{block}.attn.qkv.bias", ("blocks.{block}.attn.q_bias", ZERO, "blocks.{block}.attn.v_bias")),
    ),
)

# timm's Eva with AttentionRope's separate q / k / v, each with its bias (Sapiens2; grouped-query in
# some blocks, so the parts differ in size). Before EVA, whose marker these checkpoints match.
EVA_KEY_BIAS = Family(
    "eva_key_bias", marker=r"blocks\.\d+\.attn\.k_proj\.bias$",
    renames=_RENAMES,  # a qv projection's biases go back fused, with their zero key bias
    fused=(
        EVA.fused[0],  # q / k / v weights
        Fuse("blocks.{block}.attn.qkv.bias", ("blocks.{block}.attn.q_proj.bias", "blocks.{block}.attn.k_proj.bias",
                                              "blocks.{block}.attn.v_proj.bias")),
    ),
)


class EvaReader(Reader):
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
            if t is EvaAttention:  # q / v biases, the key's a zero buffer
                qkv_bias = "qv" if a.q_bias is not None else False
            else:
                qkv_bias = a.qkv.bias is not None
        else:
            q, k, v = (self.linear(getattr(a, n), f"{where}.{n}") for n in ("q_proj", "k_proj", "v_proj"))
            qv_bias = q.bias is not None
            if (v.bias is not None) != qv_bias or (t is AttentionRope and (k.bias is not None) != qv_bias):
                raise self.unsupported(f"bias on only some of q / k / v at {where}")
            # EVA's k_proj has no bias (zero, outside the parameters); AttentionRope's has one with q / v
            qkv_bias = qv_bias if t is AttentionRope or not qv_bias else "qv"
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
                  "attn_drop": fmt_float(a.attn_drop.p)}
        if kv_heads != a.num_heads:  # grouped-query (Sapiens2: only in the middle blocks)
            params["kv_heads"] = kv_heads
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p,
                "name": "mhsa_subln" if subln else "mhsa", "rotate_half": bool(getattr(a, "rotate_half", False))}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        from timm.models.eva import EvaBlock, EvaBlockPostNorm

        where = where or f"blocks.{i}"
        t = type(b)
        attn, mlp = self.parts(b, where, (EvaBlock, EvaBlockPostNorm))
        if t is EvaBlock:
            g1, g2 = b.gamma_1, b.gamma_2
            if g1 is None and g2 is not None:
                raise self.unsupported(f"layer scale on the MLP branch only at {where}")
            init = b.init_values if isinstance(b.init_values, (int, float)) and b.init_values > 0 else 1e-5
            block = {"name": "prenorm", "params": {"init_values": None if g1 is None else fmt_float(init)}}
            if g1 is not None and g2 is None:  # Sapiens2: timm's attn_only_layer_scale
                block["params"]["attn_only_layer_scale"] = True
        else:
            block = {"name": "respostnorm", "params": {"init_values": None}}
        return BlockRead(attn, mlp, block, float(getattr(b.drop_path1, "drop_prob", 0.0)))

    def rope(self, rotate_half: bool) -> dict | None:
        from timm.layers import RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed

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
        elif t is RotaryEmbeddingMixed:
            return self.mixed_rope(r, rotate_half)
        else:
            raise self.unsupported(f"rotary embedding {t.__name__}")
        if bool(r.rotate_half) != rotate_half:
            raise self.unsupported("RoPE whose attention pairs channels differently from its table")
        if r.dim != self.m.embed_dim // self.m.blocks[0].attn.num_heads:
            raise self.unsupported(f"RoPE over {r.dim} of the head's channels")
        return {**params, "rotate_half": rotate_half}

    def mixed_rope(self, r: nn.Module, rotate_half: bool) -> dict:
        """RoPE-Mixed (``RotaryEmbeddingMixed``): learned frequencies (2, depth, heads, head_dim / 2),
        always in the interleaved channel layout, its training augmentations in patch units."""
        m = self.m
        heads = m.blocks[0].attn.num_heads
        if rotate_half:
            raise self.unsupported("RoPE-Mixed with half rotation (its table is interleaved)")
        if r.dim != m.embed_dim or r.num_heads != heads or r.depth != len(m.blocks):
            raise self.unsupported(f"RoPE-Mixed over {r.dim} channels, {r.num_heads} heads, {r.depth} blocks")
        if tuple(r.freqs.shape) != (2, len(m.blocks), heads, m.embed_dim // heads // 2):
            raise self.unsupported(f"RoPE-Mixed frequencies of shape {tuple(r.freqs.shape)}")
        return {"variant": "mixed", "temperature": float(r.temperature), "grid_indexing": r.grid_indexing,
                "shift_coords": r.shift_coords or None, "jitter_coords": r.jitter_coords,
                "rescale_coords": r.rescale_coords, "rotate_half": False}

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
        data["layers"] = self.layers(blocks)
        heads, hidden = first.attn["heads"], first.mlp["hidden"]
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
        rope = self.rope(first.attn["rotate_half"])
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
        return self.finish(data, blocks)

    def layers(self, blocks: list[dict]) -> list[dict]:
        """``layers`` overrides for the blocks whose attention params differ from block 0's
        (Sapiens2's grouped-query middle blocks), one entry per distinct change; blocks that differ
        in anything else are refused."""
        from ...layout import format_indices

        base = blocks[0].attn["params"]
        overrides: dict[tuple, list[int]] = {}
        for i, b in enumerate(blocks[1:], start=1):
            params = b.attn["params"]
            alike = b.settings(attn=("params",)) == blocks[0].settings(attn=("params",))
            if not alike or (set(params) ^ set(base)) - {"kv_heads"}:
                raise self.unsupported(f"blocks that differ (block {i} is not configured like block 0)")
            # kv_heads absent: a key / value head per query head (null in a spec)
            change = {k: params.get(k) for k in set(params) | set(base) if params.get(k) != base.get(k)}
            if change:
                overrides.setdefault(tuple(sorted(change.items())), []).append(i)
        return [{"at": format_indices(at), "attention": {"params": dict(change)}} for change, at in overrides.items()]


# --- spec -> timm --------------------------------------------------------------------------------
# A spec whose position encoding is ``rope`` (only Eva has it) goes back to timm's ``Eva``
# (``FAMILY``), its weights through ``EVA`` (``EVA_KEY_BIAS`` for AttentionRope's key bias) read
# backwards.

# vitlab's RoPE variant <-> Eva's ``rope_type``
ROPE_TYPES: dict[str, str] = {"axial": "cat", "dinov3": "dinov3", "mixed": "mixed"}
# Eva's RoPE arguments <-> the rope params, and the variants whose timm module Eva hands each one
# (the module keeps it under the argument's name without ``rope_``, ``ref_feat_shape`` as is). Any
# other param, or one the variant's module does not get, must be at its default.
ROPE_KWARGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("rope_temperature", "temperature", ("axial", "dinov3", "mixed")),
    ("rope_grid_offset", "grid_offset", ("axial", "dinov3")),
    ("rope_grid_indexing", "grid_indexing", ("axial", "dinov3", "mixed")),
    ("rope_rotate_half", "rotate_half", ("axial", "dinov3", "mixed")),
    ("rope_shift_coords", "shift_coords", ("dinov3", "mixed")),
    ("rope_jitter_coords", "jitter_coords", ("dinov3", "mixed")),
    ("rope_rescale_coords", "rescale_coords", ("dinov3", "mixed")),
    ("ref_feat_shape", "ref_grid", ("axial",)),
)
# rope params that are Eva's other arguments, not its RoPE module's
_ROPE_OWN = ("variant", "learned", "include_prefix")


def _is_eva(spec: ViTSpec) -> bool:
    """Rotary position embedding, which among timm's isotropic ViTs only Eva has; or EVA's zero key
    bias (``qkv_bias: qv``) without it (EVA-CLIP's giants), which timm's VisionTransformer lacks."""
    qv = spec.attention.name in ("mhsa", "mhsa_subln") and spec.attention.params.get("qkv_bias") == "qv"
    return spec.stages is None and (spec.pos_embed.name == "rope" or qv)


def kv_heads(spec: ViTSpec) -> tuple[int, ...]:
    """Each block's key / value heads, ``layers`` overrides applied (one per query head where the
    spec says none)."""
    return tuple(p.selections["attention"].params.get("kv_heads") or spec.num_heads for p in spec.block_plans())


def _check_blocks(spec: ViTSpec, fail) -> None:
    """Eva configures every block alike but for its key / value heads (``num_kv_heads``, one per
    block): refuse ``layers`` overrides that change anything else."""
    def alike(selections: dict) -> dict:
        return {k: (s.name, {n: v for n, v in s.params.items() if n != "kv_heads"}) for k, s in selections.items()}

    for plan in spec.block_plans():
        if alike(plan.selections) != alike({k: spec.selection(k) for k in plan.selections}) \
                or plan.mlp_ratio != spec.mlp_ratio:
            raise fail(f"per-block overrides of more than kv_heads (block {plan.index}; timm's Eva configures every "
                       "block alike but for num_kv_heads)")


def attn_type(spec: ViTSpec) -> str:
    """Eva's ``attn_type`` for the spec: without a key bias (``qkv_bias`` false or ``qv``) or
    grouped-query heads EVA's own (``eva``); otherwise timm's ``AttentionRope`` (``rope``), whose key
    bias is a weight as vitlab's ``qkv_bias: true`` and which alone takes ``num_kv_heads``. EVA's keeps
    that bias at zero outside its state dict, which RoPE makes matter: a rotated ``k + b`` turns ``b``
    differently for every key."""
    gqa = any(h != spec.num_heads for h in kv_heads(spec))
    return "rope" if spec.attention.params["qkv_bias"] is True or gqa else "eva"


def _rope_kwargs(spec: ViTSpec, fail, registry) -> dict[str, Any]:
    """Eva's RoPE arguments for the spec's ``rope`` (``ROPE_TYPES``, ``ROPE_KWARGS``)."""
    p = spec.pos_embed.params
    variant = p["variant"]
    if variant not in ROPE_TYPES:
        raise fail(f"RoPE variant '{variant}'")
    defaults = registry.get("pos_embed", "rope").cls.Params().model_dump(mode="json")
    kw: dict[str, Any] = {"rope_type": ROPE_TYPES[variant]}
    for kwarg, param, variants in ROPE_KWARGS:
        if variant in variants:
            kw[kwarg] = tuple(p[param]) if isinstance(p[param], (list, tuple)) else p[param]
    taken = {param for _, param, variants in ROPE_KWARGS if variant in variants}
    differ = {k: v for k, v in p.items() if k not in taken and k not in _ROPE_OWN and v != defaults.get(k)}
    if differ:
        raise fail(f"RoPE {', '.join(f'{k}={v!r}' for k, v in differ.items())} (Eva's '{variant}' RoPE is built "
                   f"with {', '.join(f'{k}={defaults.get(k)!r}' for k in differ)})")
    return kw


def _map_pool_kwargs(spec: ViTSpec, fail) -> dict[str, Any]:
    """Eva's attention-pool arguments: its heads and MLP ratio; the rest is what Eva builds (one
    latent token over every token, q projection, qkv bias, GELU MLP)."""
    mp = spec.pool.params
    fixed = {"latent_len": 1, "reduce": "token", "qkv_bias": True, "qk_norm": False, "q_proj": True, "act": "gelu",
             "include_prefix": True}
    differ = {k: mp.get(k) for k, v in fixed.items() if mp.get(k) != v}
    if differ:
        raise fail(f"map pool with {', '.join(f'{k}={v!r}' for k, v in differ.items())} (Eva's attention pool: "
                   f"{', '.join(f'{k}={v!r}' for k, v in fixed.items())})")
    return {"attn_pool_num_heads": mp.get("num_heads"), "attn_pool_mlp_ratio": mp.get("mlp_ratio")}


def eva_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Eva`` (any ``eva*``, ``vit_*_dinov3``, ``vit_pe_*`` or
    ``vit_*_rope_*`` name) for a spec with rotary position embedding.

    Raises:
        SpecError: the spec uses something ``Eva`` cannot express (named).
    """
    fail = refuser(spec, "Eva")
    _check_blocks(spec, fail)
    attn, mlp, block, pos, pool = spec.attention, spec.mlp, spec.block, spec.pos_embed, spec.pool
    ap = attn.params
    if attn.name not in ("mhsa", "mhsa_subln"):
        raise fail(f"attention '{attn.name}' (Eva: mhsa, or mhsa_subln for its scale_attn_inner)")
    if not ap.get("proj_bias", True):
        raise fail("attention output projection without bias")
    heads = kv_heads(spec)
    gqa = any(h != spec.num_heads for h in heads)
    if mlp.name not in ("mlp", "swiglu") or not mlp.params.get("bias", True) or mlp.params.get("act", "gelu") != "gelu":
        raise fail(f"mlp '{mlp.name}' with {mlp.params} (Eva: GELU MLP or SwiGLU, with biases)")
    swiglu, mlp_norm = mlp.name == "swiglu", bool(mlp.params.get("norm", False))
    post = block.name == "respostnorm"
    if block.name not in ("prenorm", "respostnorm"):
        raise fail(f"block '{block.name}' (Eva: pre-norm, or res-post-norm for use_post_norm)")
    if post and (block.params.get("init_values") is not None or ap["qk_norm"] or gqa or (swiglu and not mlp_norm)):
        raise fail("a res-post-norm block with layer scale, qk-norm, grouped-query attention or a SwiGLU without "
                   "its norm (Eva's EvaBlockPostNorm has none of them, and packs that SwiGLU into one fc1)")
    if spec.norm.name not in ("layernorm", "rmsnorm"):
        raise fail(f"norm '{spec.norm.name}'")
    pad = conv_patch_embed(spec, fail, bias=not spec.pre_norm)  # Eva drops the conv's bias with its pre-norm

    if pos.name == "rope":
        kw = _rope_kwargs(spec, fail, ex.registry)
        kw.update(use_rot_pos_emb=True, use_abs_pos_emb=pos.params["learned"],
                  no_embed_class=not pos.params["include_prefix"])
    elif pos.name in ("learned", "none") and ap["qkv_bias"] == "qv":  # EVA-CLIP's giants: no RoPE
        kw = {"use_rot_pos_emb": False, "use_abs_pos_emb": pos.name == "learned",
              "no_embed_class": not pos.params.get("include_prefix", True)}
    else:
        raise fail(f"position encoding '{pos.name}' (a spec without RoPE or EVA's zero key bias is timm's "
                   "VisionTransformer)")

    final, fc_norm = spec.final_norm, bool(pool.params.get("norm", False))
    if pool.name == "map":
        kw.update(_map_pool_kwargs(spec, fail))
    elif pool.name not in ("avg", "token", "none"):
        raise fail(f"pool '{pool.name}'")
    elif fc_norm and pool.name == "token" and final:
        raise fail("both a final norm and a norm after token pooling (Eva has one or the other)")
    kw.update(
        common_kwargs(spec, fail),
        # per block, as Sapiens2's model functions pass them (num_heads in its full-attention blocks);
        # AttentionRope takes them only with q / k / v apart
        num_kv_heads=heads if gqa else None,
        qkv_bias=bool(ap["qkv_bias"]),  # with attn_type eva: q / v biases, the key's zero (qv)
        qkv_fused=not gqa,
        qk_norm=ap["qk_norm"],
        swiglu_mlp=swiglu,
        # timm's split SwiGLU (fc1_g / fc1_x, vitlab's names) rather than the GluMlp with one packed fc1
        # Eva builds without scale_mlp; aligning the hidden width to 1 leaves it as it is
        swiglu_align_to=1 if swiglu else 0,
        scale_mlp=mlp_norm,
        scale_attn_inner=attn.name == "mhsa_subln",
        attn_type=attn_type(spec),
        pos_drop_rate=spec.pos_drop_rate,
        patch_drop_rate=0.0,
        init_values=None if post else block.params.get("init_values"),
        attn_only_layer_scale=bool(block.params.get("attn_only_layer_scale", False)),
        class_token=spec.class_token,
        num_reg_tokens=spec.reg_tokens,
        use_post_norm=post,
        use_pre_transformer_norm=spec.pre_norm,
        # the norm before pooling, and fc_norm after it (after a token pool it reads back as the final norm)
        use_post_transformer_norm=final,
        use_fc_norm=fc_norm,
        dynamic_img_size=spec.dynamic_img_size,
        dynamic_img_pad=pad,
    )
    return kw


def eva_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A vitlab model's weights in timm Eva's names (``EVA`` read backwards, or with
    AttentionRope's key bias ``EVA_KEY_BIAS``, into the layout ``eva_kwargs`` builds: one
    qkv projection, or q / k / v apart with grouped-query heads)."""
    family = EVA_KEY_BIAS if attn_type(model.spec) == "rope" else EVA
    return written_back(model, ex, family)


FAMILY = TimmFamily(
    "eva", classes=("timm.models.eva.Eva",), reader=EvaReader,
    claims=_is_eva,
    timm_class="timm.models.eva.Eva", kwargs=eva_kwargs, state_dict=eva_state_dict, tables=(EVA_KEY_BIAS, EVA),
)
