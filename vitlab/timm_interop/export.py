"""The writing half's shared pieces: how a family refuses a spec, the checks and arguments timm's
ViT classes share, and a state dict written back through a family's tables (``bridge``) into the
keys of the timm model, checked name by name and shape by shape."""
from __future__ import annotations

import functools
from typing import Any, Callable, Container, Mapping

import torch

from ..errors import Problem, SpecError, WeightsError
from ..spec import ViTSpec
from .bridge import Family

# vitlab's own names for what every family's timm model names as timm's ``VisionTransformer``
# does: a learned table is its module's ``weight``; the norm after pooling (``fc_norm``) and the
# attention pool are vitlab's ``pool`` (which of the two ``pool.norm`` is, the target's keys
# tell). Loading reads it forward for the keys the family's rules do not place (``weights``:
# position tables are resampled and their prefix rows moved there; a ``fc_norm`` after token
# pooling is a final norm when the pool has none), every export inverted (``export_state_dict``).
VITLAB = Family(
    "vitlab", marker=r"(?!)",
    renames=(("pos_embed", "pos_embed.weight"), ("fc_norm.{rest}", "pool.norm.{rest}"),
             ("attn_pool.{rest}", "pool.{rest}")),
)


def no_equivalent(spec: ViTSpec, timm_class: str, why: str) -> SpecError:
    """The error for a spec ``timm_class`` cannot express, naming the feature (``why``)."""
    return SpecError([Problem("", f"spec '{spec.name}' has no timm {timm_class} equivalent: {why}")])


def refuser(spec: ViTSpec, timm_class: str) -> Callable[[str], SpecError]:
    """``why -> `` the ``no_equivalent`` error of ``spec`` for ``timm_class``."""
    return functools.partial(no_equivalent, spec, timm_class)


def pair(v):
    """An image or patch size as timm takes it: an int, or a tuple."""
    return v if isinstance(v, int) else tuple(v)


def norm_layer(spec: ViTSpec, fail: Callable[[str], SpecError]):
    """timm's norm layer for the spec's one norm."""
    from timm.layers import LayerNorm, RmsNorm

    p = spec.norm.params
    if spec.norm.name == "layernorm":
        if p.get("bias", True):
            return functools.partial(LayerNorm, eps=p["eps"])
        return functools.partial(LayerNorm, eps=p["eps"], bias=False)
    if spec.norm.name == "rmsnorm":
        return functools.partial(RmsNorm, eps=p["eps"])
    raise fail(f"norm '{spec.norm.name}'")


def check_uniform_blocks(spec: ViTSpec, fail) -> None:
    """timm configures every block alike: refuse ``layers`` overrides that change a block."""
    for plan in spec.block_plans():
        if plan.selections != {k: spec.selection(k) for k in plan.selections} or plan.mlp_ratio != spec.mlp_ratio:
            raise fail(f"per-block overrides (block {plan.index}; timm configures every block alike)")


def require(spec: ViTSpec, registry, fail: Callable[[str], SpecError], fixed: dict[str, tuple[str, dict]],
            free: dict[str, tuple[str, ...]], whose: str) -> None:
    """Each ``kind`` of ``fixed`` must select ``(name, params)`` with every other param at the
    component's default, except the ``free`` ones (which timm takes as arguments): a param added
    later (kv_heads) keeps its neutral default to mean the model timm builds. ``whose`` names the
    timm model in the message."""
    for kind, (name, params) in fixed.items():
        sel = spec.selection(kind)
        differ = {}
        if sel.name == name:
            own = {k: sel.params[k] for k in free.get(kind, ()) if k in sel.params}
            want = registry.get(kind, name).cls.Params.model_validate({**params, **own}).model_dump(mode="json")
            differ = {k: sel.params.get(k) for k in {**want, **sel.params} if sel.params.get(k) != want.get(k)}
        if sel.name != name or differ:
            listed = lambda d: ", ".join(f"{k}={v!r}" for k, v in d.items())  # noqa: E731
            raise fail(f"{kind} '{sel.name}'" + (f" with {listed(differ)}" if differ else "")
                       + f" ({whose}: {name} with {listed(params) or 'its defaults'})")


# --- what BEiT's descendants share (Beit, VisionTransformerRelPos, Eva) ---------------------------

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


def common_kwargs(spec: ViTSpec, fail) -> dict[str, Any]:
    """The arguments BEiT's descendants take alike: sizes, pooling, dropout rates and the norm."""
    return dict(
        img_size=pair(spec.img_size),
        patch_size=pair(spec.patch_size),
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
        norm_layer=norm_layer(spec, fail),
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


# --- state dicts ------------------------------------------------------------------------------------

def written_back(model, ex, table: Family, *, prepare: Callable[[dict], dict] = lambda sd: sd,
                 inert_zero: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s weights for the timm model it goes back to (``ex``'s class and arguments, built on
    the meta device: its names and shapes only), ``table`` read backwards (``export_state_dict``);
    ``prepare`` first reshapes vitlab's own tensors."""
    spec = model.spec
    with torch.device("meta"):
        target = ex.timm_class(spec)(**ex.kwargs(spec)).state_dict()
    sd = prepare({k: v.detach() for k, v in model.state_dict().items()})
    return export_state_dict(sd, table, target, inert_zero=inert_zero)


def fuse_qv_biases(sd: Mapping[str, torch.Tensor], family: Family, keys: Container[str]) -> dict[str, torch.Tensor]:
    """``sd`` with each ``qkv_bias: qv`` projection's ``qkv.q_bias`` / ``qkv.v_bias`` as one
    ``qkv.bias``, its key part zero (the buffer outside the state dict), where the target ``keys``
    have no place for them apart under ``family``'s names (BEiT's and EVA's q_bias / v_bias have)."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith("qkv.q_bias")]:
        stem = key[:-len("q_bias")]
        if all(family.to_timm(k, keys) in keys for k in (key, stem + "v_bias")):
            continue
        if stem + "v_bias" in out and stem + "bias" not in out:
            q, v = out.pop(key), out.pop(stem + "v_bias")
            out[stem + "bias"] = torch.cat([q, torch.zeros_like(v), v])  # (q + k + v,), k = v wide
    return out


def export_state_dict(sd: Mapping[str, torch.Tensor], family: Family, target: Mapping[str, torch.Tensor],
                      inert_zero: bool = False) -> dict[str, torch.Tensor]:
    """Weights ``sd`` (vitlab's names) for the timm model whose state dict is ``target`` (built on
    the meta device: only its names and shapes are read): ``VITLAB`` and then ``family`` read
    backwards into the target's keys (``Family.restore``), checked name by name and shape by shape.

    Raises:
        WeightsError: a weight has no place in the target, a target tensor gets none, a shape
            differs, or a part timm keeps at zero is non-zero (and not ``inert_zero``).
    """
    keys = set(target)
    sd = fuse_qv_biases({k: v.detach() for k, v in sd.items()}, family, keys)
    out = family.restore(VITLAB.restore(sd, into=keys), into=target, inert_zero=inert_zero)
    problems = [f"no place in timm's {family.name} model for {k}" for k in sorted(set(out) - keys)]
    problems += [f"nothing for timm's {k}" for k in sorted(keys - set(out))]
    problems += [f"{k}: {tuple(out[k].shape)} for timm's {tuple(target[k].shape)}"
                 for k in sorted(keys & set(out)) if tuple(out[k].shape) != tuple(target[k].shape)]
    if problems:  # pragma: no cover - a component with weights the tables do not know
        raise WeightsError("; ".join(problems))
    return out
