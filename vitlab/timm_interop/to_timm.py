"""vitlab -> timm: the ``timm.create_model`` arguments of the equivalent ``VisionTransformer`` (or,
for a spec with ``stages``, ``PoolingVisionTransformer``) and the state dict in timm's names, so a
model built here can be handed to timm."""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import Problem, SpecError, WeightsError
from ..spec import ViTSpec


def _no_equivalent(spec: ViTSpec, why: str) -> SpecError:
    return SpecError([Problem("", f"spec '{spec.name}' has no timm VisionTransformer equivalent: {why}")])


@dataclass(frozen=True)
class Export:
    """How the specs of one timm family go back to timm: whether ``claims(spec)``, then its timm
    class, ``create_model`` arguments and state dict (timm's names)."""

    claims: Callable[[ViTSpec], bool]
    timm_class: Callable[[ViTSpec], type]
    kwargs: Callable[[ViTSpec], dict[str, Any]]
    state_dict: Callable[[Any], dict[str, torch.Tensor]]


# the families with their own export, (module here, ``Export`` in it); first claim wins, and a spec
# none claims goes to timm's ``VisionTransformer`` (or DeiT's distilled subclass) below
EXPORTS: tuple[tuple[str, str], ...] = (
    (".pit", "PIT_EXPORT"),
)


def _export(spec: ViTSpec) -> Export | None:
    for module, attr in EXPORTS:
        ex = getattr(importlib.import_module(module, __package__), attr)
        if ex.claims(spec):
            return ex
    return None


def check_uniform_blocks(spec: ViTSpec, fail) -> None:
    """timm configures every block alike: refuse ``layers`` overrides that change a block."""
    for plan in spec.block_plans():
        if plan.selections != {k: spec.selection(k) for k in plan.selections} or plan.mlp_ratio != spec.mlp_ratio:
            raise fail(f"per-block overrides (block {plan.index}; timm configures every block alike)")


def _norm_layer(spec: ViTSpec):
    from timm.layers import LayerNorm, RmsNorm

    p = spec.norm.params
    if spec.norm.name == "layernorm":
        if p.get("bias", True):
            return functools.partial(LayerNorm, eps=p["eps"])
        return functools.partial(LayerNorm, eps=p["eps"], bias=False)
    if spec.norm.name == "rmsnorm":
        return functools.partial(RmsNorm, eps=p["eps"])
    raise _no_equivalent(spec, f"norm '{spec.norm.name}'")


def timm_kwargs(spec: ViTSpec | Any) -> dict[str, Any]:
    """Keyword arguments of the timm ``VisionTransformer`` equivalent to ``spec``.

    Every architectural argument is given, so both ``timm.models.vision_transformer.VisionTransformer(**kw)``
    and ``timm.create_model(<any vit_* name>, pretrained=False, **kw)`` build the same model. A
    spec with ``stages`` gives the arguments of ``timm.models.pit.PoolingVisionTransformer`` (any
    ``pit_*`` name). Load its weights with ``to_timm_state_dict``.

    Raises:
        SpecError: the spec uses something timm's ``VisionTransformer`` cannot express (named).
    """
    if not isinstance(spec, ViTSpec):
        from ..recipes import load_spec

        spec = load_spec(spec)
    if (ex := _export(spec)) is not None:
        return ex.kwargs(spec)
    from timm.layers import Mlp, SwiGLU
    from timm.models.vision_transformer import Block, ParallelScalingBlock, ResPostBlock

    fail = functools.partial(_no_equivalent, spec)
    attn, mlp, block, pool = spec.attention, spec.mlp, spec.block, spec.pool
    pe, pos, norm = spec.patch_embed, spec.pos_embed, spec.norm

    if attn.name not in ("mhsa", "mhsa_subln"):
        raise fail(f"attention '{attn.name}'")
    ap = attn.params
    if ap.get("kv_heads") not in (None, spec.num_heads):
        raise fail(f"grouped-query attention (kv_heads={ap['kv_heads']}; timm's Attention has a key and value head "
                   "per query head)")
    check_uniform_blocks(spec, fail)
    if mlp.name == "mlp":
        mlp_layer, act = Mlp, mlp.params["act"]
    elif mlp.name == "swiglu":
        mlp_layer, act = SwiGLU, "silu"
    else:
        raise fail(f"mlp '{mlp.name}'")
    if norm.name not in ("layernorm", "rmsnorm"):
        raise fail(f"norm '{norm.name}'")

    init_values = block.params.get("init_values")
    if block.name == "prenorm":
        block_fn = Block
    elif block.name == "respostnorm":
        if init_values is not None:
            raise fail("layer scale in a res-post-norm block (timm's ResPostBlock has none)")
        block_fn = ResPostBlock
    elif block.name == "parallel":
        if not block.params.get("shared_norm", True):
            raise fail("parallel block with separate norms (timm's ParallelScalingBlock shares one)")
        if mlp.name != "mlp" or mlp.params.get("norm"):
            raise fail("parallel block with a gated or normed MLP (ParallelScalingBlock fuses a plain MLP)")
        block_fn = ParallelScalingBlock
    else:
        raise fail(f"block '{block.name}'")
    if block.name != "parallel":
        # timm's Mlp bias follows proj_bias; a bias timm has but vitlab lacks loads as zeros
        if mlp.params.get("bias", True) and not ap["proj_bias"]:
            raise fail("MLP bias without attention output bias (timm ties both to proj_bias)")

    if pe.name not in ("conv", "linear"):
        raise fail(f"patch embedding '{pe.name}'")
    if pe.params.get("stride") not in (None, *spec.patch_hw) or spec.patch_hw[0] != spec.patch_hw[1] and pe.params.get("stride"):
        raise fail(f"patch stride {pe.params['stride']} other than the patch size")
    if pe.params.get("bias", True) and spec.pre_norm:
        raise fail("patch-embedding bias together with pre_norm (timm drops that bias when pre_norm is set)")

    kw: dict[str, Any] = {}
    if pos.name == "learned":
        kw.update(pos_embed="learn", no_embed_class=not pos.params.get("include_prefix", True))
    elif pos.name == "none":
        kw.update(pos_embed="none", no_embed_class=False)
    elif pos.name == "sincos2d":
        if spec.dynamic_img_size:
            raise fail("sincos2d with dynamic_img_size (timm would resample a fixed table, not recompute it)")
        kw.update(pos_embed="learn", no_embed_class=True)  # the fixed table, stored as timm's pos_embed
    else:
        raise fail(f"position encoding '{pos.name}'")

    fc_norm, include_prefix = False, False
    final_norm = spec.final_norm
    if pool.name == "token":
        global_pool = "token"
        if pool.params.get("norm"):  # timm's fc_norm follows its pooling
            if spec.final_norm:
                raise fail("both a final norm and a norm after token pooling (timm has one or the other)")
            fc_norm, final_norm = True, True
    elif pool.name == "none":
        global_pool = ""
    elif pool.name == "avg":
        global_pool = "avg"
        if pool.params.get("norm"):
            if spec.final_norm:
                raise fail("both a final norm and a norm after average pooling (timm has one or the other)")
            fc_norm, final_norm = True, True
    elif pool.name == "distilled":  # timm's VisionTransformerDistilled (``timm_class``)
        if not spec.class_token or spec.reg_tokens != 1 or pool.params.get("norm"):
            raise fail("distilled pool other than class token + one distillation token without a pool norm "
                       "(timm's VisionTransformerDistilled)")
        if not pos.params.get("include_prefix", True) or pos.name != "learned":
            raise fail("distillation token without its position row (VisionTransformerDistilled embeds both tokens)")
        global_pool = "token"
    elif pool.name == "map":
        global_pool = "map"
        mp = pool.params
        defaults = {"num_heads": None, "mlp_ratio": None, "latent_len": 1, "reduce": "token", "qkv_bias": True,
                    "qk_norm": False, "q_proj": True, "act": act}
        differ = [k for k, v in defaults.items() if mp.get(k, v) != v and not
                  (k == "num_heads" and mp.get(k) == spec.num_heads) and not
                  (k == "mlp_ratio" and mp.get(k) is not None and int(spec.embed_dim * mp[k]) == spec.mlp_hidden_dim)]
        if differ:
            raise fail(f"map pool with {', '.join(f'{k}={mp.get(k)!r}' for k in differ)} (timm builds its attention "
                       "pool with the model's heads, mlp ratio and activation)")
        include_prefix = bool(mp.get("include_prefix", False))
    else:
        raise fail(f"pool '{pool.name}'")

    kw.update(
        img_size=spec.img_size if isinstance(spec.img_size, int) else tuple(spec.img_size),
        patch_size=spec.patch_size if isinstance(spec.patch_size, int) else tuple(spec.patch_size),
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
        global_pool=global_pool,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=ap["qkv_bias"],
        qk_norm=ap["qk_norm"],
        scale_attn_norm=attn.name == "mhsa_subln",
        scale_mlp_norm=bool(mlp.params.get("norm", False)),
        proj_bias=ap["proj_bias"],
        init_values=init_values if block.name != "respostnorm" else None,
        class_token=spec.class_token,
        reg_tokens=0 if pool.name == "distilled" else spec.reg_tokens,
        pre_norm=spec.pre_norm,
        final_norm=final_norm,
        fc_norm=fc_norm,
        pool_include_prefix=include_prefix,
        dynamic_img_size=spec.dynamic_img_size,
        dynamic_img_pad=bool(pe.params.get("pad", False)),
        drop_rate=spec.drop_rate,
        pos_drop_rate=spec.pos_drop_rate,
        patch_drop_rate=0.0,
        proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=ap.get("attn_drop", 0.0),
        drop_path_rate=spec.drop_path_rate,
        embed_norm_layer=_norm_layer(spec) if pe.params.get("norm") else None,
        norm_layer=_norm_layer(spec),
        act_layer=act,
        block_fn=block_fn,
        mlp_layer=mlp_layer,
    )
    return kw


def timm_class(spec: ViTSpec | Any) -> type:
    """The timm class ``timm_kwargs(spec)`` are for: ``VisionTransformer``, DeiT's
    ``VisionTransformerDistilled`` (pool ``distilled``) or PiT's ``PoolingVisionTransformer``
    (a spec with ``stages``)."""
    if not isinstance(spec, ViTSpec):
        from ..recipes import load_spec

        spec = load_spec(spec)
    if (ex := _export(spec)) is not None:
        return ex.timm_class(spec)
    if spec.pool.name == "distilled":
        from timm.models.deit import VisionTransformerDistilled

        return VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def to_timm_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of a vitlab model in timm's names, for ``timm_kwargs(model.spec)``'s model.

    Raises:
        SpecError: the spec has no timm equivalent.
        WeightsError: a weight timm's model has no place for is non-zero.
    """
    if (ex := _export(model.spec)) is not None:
        return ex.state_dict(model)
    kw = timm_kwargs(model.spec)
    spec = model.spec
    D = spec.embed_dim
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        return sd.pop(key)

    def must_be_zero(key: str, why: str) -> None:
        if key in sd:
            t = sd.pop(key)
            if torch.count_nonzero(t):
                raise WeightsError(f"{key} is non-zero but {why}; no timm equivalent of these weights")

    # --- embedding --------------------------------------------------------------------------
    w = take("patch_embed.proj.weight")
    if w.ndim == 2:  # linear embedder: (D, C * ph * pw) in the conv kernel's order
        w = w.reshape(D, spec.in_chans, *spec.patch_hw)
    out["patch_embed.proj.weight"] = w
    if "patch_embed.proj.bias" in sd:
        out["patch_embed.proj.bias"] = take("patch_embed.proj.bias")
    elif not spec.pre_norm:  # timm's conv has a bias unless pre_norm
        out["patch_embed.proj.bias"] = w.new_zeros(D)
    for k in [k for k in sd if k.startswith("patch_embed.norm.")]:
        out[k] = take(k)
    for k in ("cls_token", "reg_token"):
        if k in sd:
            out[k] = take(k)
    if spec.pos_embed.name == "learned":
        out["pos_embed"] = take("pos_embed.weight")
    elif spec.pos_embed.name == "sincos2d":
        out["pos_embed"] = model.pos_embed.pe.detach().clone()  # the fixed table, patches only
    for k in [k for k in sd if k.startswith("norm_pre.")]:
        out[k] = take(k)

    # --- blocks -----------------------------------------------------------------------------
    for i in range(spec.depth):
        p = f"blocks.{i}."
        if spec.block.name != "parallel":
            for k in [k for k in sd if k.startswith(p)]:
                out[k] = take(k)
            if not spec.mlp.params.get("bias", True) and kw["proj_bias"]:
                fc1 = ["fc1_g", "fc1_x"] if spec.mlp.name == "swiglu" else ["fc1"]
                for name in fc1:
                    weight = out[f"{p}mlp.{name}.weight"]
                    out[f"{p}mlp.{name}.bias"] = weight.new_zeros(weight.shape[0])
                out[f"{p}mlp.fc2.bias"] = out[f"{p}mlp.fc2.weight"].new_zeros(D)
            continue
        # vitlab parallel block -> timm ParallelScalingBlock (separate output projections)
        for k in ("weight", "bias"):
            if p + "norm1." + k in sd:
                out[p + "in_norm." + k] = take(p + "norm1." + k)
        fc1_w, qkv_w = take(p + "mlp.fc1.weight"), take(p + "attn.qkv.weight")
        out[p + "in_proj.weight"] = torch.cat([fc1_w, qkv_w], dim=0)
        fc1_b = sd.pop(p + "mlp.fc1.bias", None)
        if fc1_b is None:
            fc1_b = fc1_w.new_zeros(fc1_w.shape[0])
        if kw["qkv_bias"]:
            out[p + "in_proj.bias"] = torch.cat([fc1_b, take(p + "attn.qkv.bias")], dim=0)
        else:
            out[p + "mlp_bias"] = fc1_b
        for k in [k for k in sd if k.startswith(p + "attn.q_norm.") or k.startswith(p + "attn.k_norm.")]:
            out[p + k[len(p + "attn."):]] = take(k)
        out[p + "attn_out_proj.weight"] = take(p + "attn.proj.weight")
        out[p + "mlp_out_proj.weight"] = take(p + "mlp.fc2.weight")
        if kw["proj_bias"]:
            out[p + "attn_out_proj.bias"] = take(p + "attn.proj.bias")
            fc2_b = sd.pop(p + "mlp.fc2.bias", None)
            if fc2_b is None:
                fc2_b = out[p + "mlp_out_proj.weight"].new_zeros(D)
            out[p + "mlp_out_proj.bias"] = fc2_b
        else:
            must_be_zero(p + "mlp.fc2.bias", "timm's ParallelScalingBlock without proj_bias has no MLP output bias")
        if p + "ls1.gamma" in sd:
            g1, g2 = take(p + "ls1.gamma"), take(p + "ls2.gamma")
            if not torch.equal(g1, g2):
                raise WeightsError(f"{p}ls1.gamma and ls2.gamma differ; timm's ParallelScalingBlock has one layer scale")
            out[p + "ls.gamma"] = g1

    # --- head -------------------------------------------------------------------------------
    for k in [k for k in sd if k.startswith("norm.")]:
        out[k] = take(k)
    prefix = "attn_pool." if spec.pool.name == "map" else "fc_norm."
    src = "pool." if spec.pool.name == "map" else "pool.norm."
    for k in [k for k in sd if k.startswith(src)]:
        out[prefix + k[len(src):]] = take(k)
    for k in [k for k in sd if k.startswith("head.")]:
        out[k] = take(k)
    if sd:  # pragma: no cover - a component with weights this converter does not know
        raise WeightsError(f"no timm name for: {', '.join(sorted(sd))}")
    if spec.pool.name == "distilled":  # the bridge's table read backwards: dist_token, head_dist
        from .bridge import DEIT_DISTILLED

        out = DEIT_DISTILLED.restore(out)
    return out
