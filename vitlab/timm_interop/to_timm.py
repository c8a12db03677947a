"""vitlab -> timm: the ``timm.create_model`` arguments of the equivalent ``VisionTransformer`` (or,
for a spec with ``stages``, ``PoolingVisionTransformer``) and the state dict in timm's names, so a
model built here can be handed to timm."""
from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ..errors import Problem, SpecError, WeightsError
from ..spec import ViTSpec
from .equivalents import SLOTS


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
    # spec fields the timm class does not keep, so its model reads back without them (a nominal size)
    unkept: tuple[str, ...] = ()


def unkept_fields(spec: ViTSpec) -> tuple[str, ...]:
    """The fields of ``spec`` that its timm equivalent does not keep (``Export.unkept``)."""
    ex = _export(spec)
    return () if ex is None else ex.unkept


# the families with their own export, (module here, ``Export`` in it); first claim wins, and a spec
# none claims goes to timm's ``VisionTransformer`` (or DeiT's distilled subclass) below
EXPORTS: tuple[tuple[str, str], ...] = (
    (".qwen3", "QWEN3_EXPORT"),  # pos_embed rope_table
    (".deepseek", "DEEPSEEK_EXPORT"),  # rope with a VLM pool or a bias-free SwiGLU; before EVA, which claims rope
    (".gemma4", "GEMMA4_EXPORT"),  # mhsa_qkvnorm or rope_axes
    (".hybrid", "HYBRID_EXPORT"),  # before the families that read the rest of a hybrid's spec
    (".eva", "EVA_EXPORT"),  # pos_embed rope
    (".beit", "BEIT_EXPORT"),  # mhsa_relpos with the class token
    (".relpos", "RELPOS_EXPORT"),  # a bias MLP, or mhsa_relpos without the class token
    (".naflex", "NAFLEX_EXPORT"),
    (".cait", "CAIT_EXPORT"),  # before PiT, which claims any spec with stages
    (".xcit", "XCIT_EXPORT"),  # before PiT, which claims any spec with stages
    (".sam", "SAM_EXPORT"),
    (".convit", "CONVIT_EXPORT"),  # before PiT, which claims any spec with stages
    (".pit", "PIT_EXPORT"),
)


def _export(spec: ViTSpec) -> Export | None:
    for module, attr in EXPORTS:
        ex = getattr(importlib.import_module(module, __package__), attr)
        if ex.claims(spec):
            return ex
    return None


def _as_class(layer: Any) -> type:
    """timm's Block wants its ``attn_layer`` as a class (it asks ``issubclass``): a ``partial`` of a
    class with keywords becomes a subclass whose constructor has those keywords bound."""
    if isinstance(layer, functools.partial) and isinstance(layer.func, type) and not layer.args:
        cls = layer.func
        return type(cls.__name__, (cls,), {"__init__": functools.partialmethod(cls.__init__, **layer.keywords),
                                           "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return layer


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
    from timm.layers import Attention, DiffAttention, Mlp, SwiGLU
    from timm.models.vision_transformer import (
        Block, DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock, ResPostBlock,
    )

    fail = functools.partial(_no_equivalent, spec)
    attn, mlp, block, pool = spec.attention, spec.mlp, spec.block, spec.pool
    pe, pos, norm = spec.patch_embed, spec.pos_embed, spec.norm

    from ..plugins import get_registry

    # plugin components with a declared timm twin fill timm's slot (``vitlab_timm_equivalents``)
    twins = {kind: get_registry().timm_equivalents.get((kind, spec.selection(kind).name)) for kind in SLOTS}
    if twins["attention"] is None and attn.name not in ("mhsa", "mhsa_subln", "mhsa_diff"):
        raise fail(f"attention '{attn.name}'")
    ap = attn.params
    diff = attn.name == "mhsa_diff"
    attn_layer = DiffAttention if diff else Attention
    if twins["attention"] is not None:
        attn_layer = _as_class(twins["attention"].layer(ap))
    if diff and ap.get("dual_lambda") and block.name != "parallel":
        raise fail("differential attention with dual_lambda outside a parallel block (timm's VisionTransformer "
                   "builds DiffAttention with its four lambda vectors)")
    if ap.get("kv_heads") not in (None, spec.num_heads):
        raise fail(f"grouped-query attention (kv_heads={ap['kv_heads']}; timm's Attention has a key and value head "
                   "per query head)")
    check_uniform_blocks(spec, fail)
    if twins["mlp"] is not None:
        mlp_layer, act = twins["mlp"].layer(mlp.params), mlp.params.get("act", "gelu")
    elif mlp.name == "mlp":
        mlp_layer, act = Mlp, mlp.params["act"]
    elif mlp.name == "swiglu":
        mlp_layer, act = SwiGLU, "silu"
    else:
        raise fail(f"mlp '{mlp.name}'")
    if norm.name not in ("layernorm", "rmsnorm"):
        raise fail(f"norm '{norm.name}'")

    init_values = block.params.get("init_values")
    if twins["block"] is not None:
        block_fn = twins["block"].layer(block.params)
    elif block.name == "prenorm":
        if block.params.get("attn_only_layer_scale"):
            raise fail("layer scale on the attention branch only (timm's Block scales both)")
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
        if diff:  # the differential variant fuses both output projections, as timm always does
            if ap.get("subln"):
                raise fail("parallel block with a normed differential attention (DiffParallelScalingBlock has none)")
            block_fn = DiffParallelScalingBlock
            if ap.get("dual_lambda"):
                block_fn = functools.partial(DiffParallelScalingBlock, dual_lambda=True)
    elif block.name == "parallel_branches":
        n = block.params.get("branches", 2)
        block_fn = ParallelThingsBlock if n == 2 else functools.partial(ParallelThingsBlock, num_parallel=n)
    else:
        raise fail(f"block '{block.name}'")
    if block.name != "parallel":
        # timm's Mlp bias follows proj_bias; a bias timm has but vitlab lacks loads as zeros
        if mlp.params.get("bias", True) and not ap.get("proj_bias", True):
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
        scale_attn_norm=attn.name == "mhsa_subln" or bool(diff and ap.get("subln")),
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
        attn_layer=attn_layer,
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
    return vit_state_dict(model)


def patchify_state(spec: ViTSpec, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``PatchEmbed``'s weights (vitlab's ``conv`` / ``linear`` embedder), taken out of ``sd``."""
    D = spec.embed_dim
    out: dict[str, torch.Tensor] = {}
    w = sd.pop("patch_embed.proj.weight")
    if w.ndim == 2:  # linear embedder: (D, C * ph * pw) in the conv kernel's order
        w = w.reshape(D, spec.in_chans, *spec.patch_hw)
    out["patch_embed.proj.weight"] = w
    if "patch_embed.proj.bias" in sd:
        out["patch_embed.proj.bias"] = sd.pop("patch_embed.proj.bias")
    elif not spec.pre_norm:  # timm's conv has a bias unless pre_norm
        out["patch_embed.proj.bias"] = w.new_zeros(D)
    for k in [k for k in sd if k.startswith("patch_embed.norm.")]:
        out[k] = sd.pop(k)
    return out


def _parallel_values(spec: ViTSpec, sd: dict[str, torch.Tensor], target) -> None:
    """What ``families.PARALLEL``'s names cannot say, done in vitlab's names before it is read
    backwards: timm's ParallelScalingBlock has one layer scale (``ls2`` must equal ``ls1``), always
    an MLP input bias and, with ``proj_bias``, an MLP output bias (zeros where vitlab's MLP has none;
    without, vitlab's must be zero), and a fused ``out_proj`` (DiffParallelScalingBlock) one bias."""
    for i in range(spec.depth):
        p = f"blocks.{i}."
        if p + "ls1.gamma" in sd and not torch.equal(sd[p + "ls1.gamma"], sd.pop(p + "ls2.gamma")):
            raise WeightsError(f"{p}ls1.gamma and ls2.gamma differ; timm's ParallelScalingBlock has one layer scale")
        fc1, fc2 = sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc2.weight"]
        sd.setdefault(p + "mlp.fc1.bias", fc1.new_zeros(fc1.shape[0]))
        fc2_bias = sd.pop(p + "mlp.fc2.bias", None)
        if p + "out_proj.bias" in target:  # y = W_a a + W_m m + (b_a + b_m)
            if fc2_bias is not None:
                sd[p + "attn.proj.bias"] = sd[p + "attn.proj.bias"] + fc2_bias
        elif p + "mlp_out_proj.bias" in target:
            sd[p + "mlp.fc2.bias"] = fc2.new_zeros(fc2.shape[0]) if fc2_bias is None else fc2_bias
        elif fc2_bias is not None and torch.count_nonzero(fc2_bias):
            raise WeightsError(f"{p}mlp.fc2.bias is non-zero but timm's ParallelScalingBlock without proj_bias has "
                               "no MLP output bias; no timm equivalent of these weights")


def vit_state_dict(model, embed: Callable[[ViTSpec, dict], dict] = patchify_state) -> dict[str, torch.Tensor]:
    """``to_timm_state_dict`` for timm's ``VisionTransformer``: ``embed(spec, sd)`` takes the patch
    embedding's weights out of ``sd`` in timm's names (a family with another embedder passes its own).
    The names are the tables of ``bridge`` read backwards into the keys of the timm model (built on
    the meta device), the values what those tables cannot say."""
    from .bridge import Family
    from .families import DEIT_DISTILLED, PARALLEL, export_state_dict
    from .equivalents import renames

    spec, cls = model.spec, timm_class(model.spec)
    with torch.device("meta"):
        target = cls(**timm_kwargs(spec)).state_dict()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd.update(embed(spec, sd))
    if spec.pos_embed.name == "sincos2d":
        sd["pos_embed.weight"] = model.pos_embed.pe.detach().clone()  # the fixed table, patches only
    if spec.block.name == "parallel":
        _parallel_values(spec, sd, target)
    elif not spec.mlp.params.get("bias", True):  # timm's Mlp biases follow proj_bias: vitlab lacks them, so zeros
        for key in [k for k in target if re.match(r"blocks\.\d+\.(.+\.)?mlp\.fc\w*\.bias$", k) and k not in sd]:
            weight = sd[key[:-len("bias")] + "weight"]
            sd[key] = weight.new_zeros(weight.shape[0])
    if spec.pool.name == "distilled":
        sd = DEIT_DISTILLED.restore(sd, into=target)
    if (plugins := renames(model.registry)) is not None:  # plugin twins' names
        sd = plugins.restore(sd, into=target)
    family = PARALLEL if spec.block.name == "parallel" else Family(cls.__name__, marker=r"(?!)")
    return export_state_dict(SimpleNamespace(state_dict=lambda: sd), family, target)

