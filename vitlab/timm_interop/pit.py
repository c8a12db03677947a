"""timm's ``PoolingVisionTransformer`` (PiT, Heo et al. 2021) <-> a staged vitlab spec.

PiT is a vitlab model with ``stages``: an overlapping ``conv`` patch embedding (``stride``), a
learned position table over the patches only, ``pit_pool`` transitions (stride 2) and the class
token(s) normed after pooling; the distilled variants add a distillation token (vitlab's first
register token) and the ``distilled`` pool. The parameter names are one table, ``PIT_NAMES``, that
loading reads from timm to vitlab and exporting reads back.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import Problem, SpecError, WeightsError
from ..spec import ViTSpec
from .spec_from import _fmt_float, _Reader
from .to_timm import Export

# timm PiT name <-> vitlab name, first match wins in either direction. ``{stage}`` is the stage,
# ``{j}`` a block within it and ``{block}`` the same block counted across the whole model;
# ``{rest}`` is the rest of the dotted name. A tuple on the vitlab side lists alternatives, the
# first the model has: PiT norms the class tokens after the last stage, which is the pool's norm
# in a spec read from timm and the final norm in one that norms every token (same function).
PIT_NAMES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    ("patch_embed.conv.{rest}", "patch_embed.proj.{rest}"),
    ("pos_embed", "pos_embed.weight"),  # (1, D, gh, gw) <-> (1, gh * gw, D): see ``pos_table``
    ("transformers.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
    ("transformers.{stage}.pool.{rest}", "transitions.{stage}.{rest}"),
    ("norm.{rest}", ("pool.norm.{rest}", "norm.{rest}")),
    ("head_dist.{rest}", "head.dist.{rest}"),
    ("head.{rest}", "head.{rest}"),
)
# timm tensor <-> the vitlab tensors it concatenates along dim 1: the distilled models keep the
# class and distillation tokens in one ``cls_token`` (1, 2, D); the tensors the model lacks are
# left out (one class token: a plain copy).
PIT_FUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cls_token", ("cls_token", "reg_token")),
)


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    """``"blocks.{block}.{rest}"`` -> a regex with those named groups."""
    fields = {"rest": r"(?P<rest>.+)", "stage": r"(?P<stage>\d+)", "j": r"(?P<j>\d+)", "block": r"(?P<block>\d+)"}
    out = re.escape(template)
    for name, rx in fields.items():
        out = out.replace(re.escape("{" + name + "}"), rx)
    return re.compile(out + "$")


class NameTable:
    """``PIT_NAMES`` read in both directions, given the stage depths (``{block}`` = the stage's
    first block + ``{j}``; a ``{j}`` beyond its stage's depth has no counterpart)."""

    def __init__(self, pairs=PIT_NAMES):
        self.pairs = [(t, v if isinstance(v, tuple) else (v,)) for t, v in pairs]

    @staticmethod
    def _fields(match: re.Match, depths: Sequence[int]) -> dict[str, Any] | None:
        f = {k: (int(v) if k != "rest" else v) for k, v in match.groupdict().items()}
        starts = [sum(depths[:s]) for s in range(len(depths))]
        if "block" in f:
            stage = next((s for s in range(len(depths)) if starts[s] <= f["block"] < starts[s] + depths[s]), None)
            if stage is None:
                return None
            f.update(stage=stage, j=f["block"] - starts[stage])
        elif "j" in f:
            if f["stage"] >= len(depths) or f["j"] >= depths[f["stage"]]:
                return None
            f["block"] = starts[f["stage"]] + f["j"]
        return f

    def to_vitlab(self, key: str, depths: Sequence[int], has=lambda k: True) -> str | None:
        """The vitlab name of timm's ``key`` (the first alternative ``has`` accepts), or ``None``."""
        for timm_t, vitlab_ts in self.pairs:
            if m := _pattern(timm_t).match(key):
                f = self._fields(m, depths)
                if f is None:
                    return None
                names = [t.format(**f) for t in vitlab_ts]
                return next((n for n in names if has(n)), names[0])
        return None

    def to_timm(self, key: str, depths: Sequence[int]) -> str | None:
        """timm's name for vitlab's ``key``, or ``None``."""
        for timm_t, vitlab_ts in self.pairs:
            for vitlab_t in vitlab_ts:
                if m := _pattern(vitlab_t).match(key):
                    f = self._fields(m, depths)
                    return None if f is None else timm_t.format(**f)
        return None


NAMES = NameTable()


def is_pit_checkpoint(keys) -> bool:
    return any(k.startswith(("transformers.", "patch_embed.conv.")) for k in keys)


def pos_table(pe: torch.Tensor) -> torch.Tensor:
    """PiT's position table as an image (1, D, gh, gw) -> vitlab's rows (1, gh * gw, D)."""
    return pe.flatten(2).transpose(1, 2)


# what timm's PoolingVisionTransformer builds: kind -> (component, the params it fixes); every
# other param must be at its default, except these, which timm takes as arguments
PIT_SELECTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "attention": ("mhsa", {"qkv_bias": True, "proj_bias": True, "qk_norm": False}),
    "mlp": ("mlp", {"act": "gelu", "bias": True, "norm": False}),
    "norm": ("layernorm", {"eps": 1e-6, "bias": True}),
    "block": ("prenorm", {"init_values": None}),
    "patch_embed": ("conv", {"bias": True, "norm": False, "pad": False}),
    "pos_embed": ("learned", {"include_prefix": False}),
}
PIT_FREE_PARAMS: dict[str, tuple[str, ...]] = {"attention": ("attn_drop",), "patch_embed": ("stride",)}


def _unsupported_spec(spec: ViTSpec, why: str) -> SpecError:
    return SpecError([Problem("", f"spec '{spec.name}' has no timm PoolingVisionTransformer equivalent: {why}")])


# --- timm -> spec --------------------------------------------------------------------------------

def _settings(block: dict) -> dict:
    """A block as read, without what differs between stages (width, heads) or blocks (drop path)."""
    return {**block, "drop_path": 0.0, "attn": {**block["attn"], "heads": 0}, "mlp": {**block["mlp"], "hidden": 0}}


class PitReader(_Reader):
    """Reads a ``PoolingVisionTransformer`` instance (its modules and shapes, never its name)."""

    def patch_embed(self) -> dict:
        from timm.models.pit import ConvEmbedding

        pe = self.m.patch_embed
        if type(pe) is not ConvEmbedding or type(pe.conv) is not nn.Conv2d:
            raise self.unsupported(f"patch embedding {type(pe).__name__}")
        conv, ps = pe.conv, tuple(pe.patch_size)
        stride = tuple(conv.stride)
        if (tuple(conv.kernel_size) != ps or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1)
                or conv.groups != 1 or stride[0] != stride[1]):
            raise self.unsupported("patch projection other than an unpadded conv with kernel = patch size "
                                   "and one stride")
        h, w = pe.img_size
        # stride null means "the patch size" and then needs whole patches; otherwise say it
        plain = stride == ps and not (h % ps[0] or w % ps[1])
        return {
            "img_size": [int(h), int(w)] if h != w else int(h),
            "patch_size": [int(ps[0]), int(ps[1])] if ps[0] != ps[1] else int(ps[0]),
            "in_chans": conv.in_channels,
            "patch_embed": {"name": "conv", "params": {"bias": conv.bias is not None,
                                                       "stride": None if plain else int(stride[0])}},
        }

    def transition(self, pool: nn.Module, s: int, in_dim: int) -> tuple[int, dict]:
        from timm.models.pit import Pooling

        where = f"transformers.{s}.pool"
        if type(pool) is not Pooling:
            raise self.unsupported(f"stage transition {type(pool).__name__} at {where}")
        conv, fc = pool.conv, self.linear(pool.fc, f"{where}.fc")
        st = conv.stride[0]
        if (tuple(conv.stride) != (st, st) or tuple(conv.kernel_size) != (st + 1, st + 1)
                or tuple(conv.padding) != (st // 2, st // 2) or not conv.groups == conv.in_channels == in_dim
                or conv.padding_mode != "zeros" or tuple(conv.dilation) != (1, 1) or conv.bias is None):
            raise self.unsupported(f"pooling other than a depthwise conv (kernel stride + 1, padding stride // 2, "
                                   f"zero padding, bias) at {where}")
        if fc.bias is None or (fc.in_features, fc.out_features) != (in_dim, conv.out_channels):
            raise self.unsupported(f"class-token map of another shape or without bias at {where}.fc")
        return conv.out_channels, {"name": "pit_pool", "params": {"stride": int(st)}}

    def spec(self) -> ViTSpec:
        from timm.models.pit import PoolingVisionTransformer, Transformer

        m = self.m
        if type(m) is not PoolingVisionTransformer:
            raise self.unsupported(f"PoolingVisionTransformer subclass {type(m).__name__}")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        width = m.patch_embed.conv.out_channels
        grid = tuple(m.patch_embed.grid_size)
        if m.pos_embed is None or tuple(m.pos_embed.shape) != (1, width, *grid):
            raise self.unsupported("position embedding of another shape than the patch grid")
        data["pos_embed"] = {"name": "learned", "params": {"include_prefix": False}}
        if m.pos_drop.p:
            raise self.unsupported("position dropout (pos_drop_rate): PiT spares the class tokens, vitlab does not")

        stages, blocks = [], []
        for s, t in enumerate(m.transformers):
            if type(t) is not Transformer:
                raise self.unsupported(f"stage {type(t).__name__} at transformers.{s}")
            if not self.is_id(t.norm):
                raise self.unsupported(f"norm at the start of stage {s} (transformers.{s}.norm)")
            stage: dict[str, Any] = {}
            if s == 0:
                if t.pool is not None:
                    raise self.unsupported("pooling before the first stage")
            else:
                width, stage["transition"] = self.transition(t.pool, s, width)
            if not len(t.blocks):
                raise self.unsupported(f"stage {s} without blocks")
            read = [self.block(b, len(blocks) + j, width, f"transformers.{s}.blocks.{j}")
                    for j, b in enumerate(t.blocks)]
            heads = read[0]["attn"]["heads"]
            stages.append({"depth": len(read), "embed_dim": width, "num_heads": heads, **stage})
            blocks += [(b, width, heads) for b in read]

        first, w0, _ = blocks[0]
        ratio = self.mlp_ratio(first["mlp"]["hidden"], "transformers.0.blocks.0.mlp", w0)
        for i, (b, w, heads) in enumerate(blocks):
            if _settings(b) != _settings(first) or b["attn"]["heads"] != heads:
                raise self.unsupported(f"blocks that differ (block {i} is not configured like block 0)")
            if int(w * ratio) != b["mlp"]["hidden"]:
                raise self.unsupported(f"MLP ratio that differs between stages (block {i})")
        data.update(stages=stages, mlp_ratio=ratio, attention={"name": "mhsa", "params": first["attn"]["params"]},
                    mlp={"name": first["mlp"]["name"], "params": first["mlp"]["params"]}, block=first["block"])

        # the class token, and the distilled models' distillation token as the first register token
        distilled = m.head_dist is not None
        tokens = 2 if distilled else 1
        if tuple(m.cls_token.shape) != (1, tokens, stages[0]["embed_dim"]):
            raise self.unsupported(f"class tokens of shape {tuple(m.cls_token.shape)}")
        data.update(class_token=True, reg_tokens=tokens - 1)
        if getattr(m, "distilled_training", False):
            raise self.unsupported("distilled training mode (separate class and distillation logits)")
        if m.global_pool != "token":
            raise self.unsupported(f"global_pool '{m.global_pool}' (the class tokens without pooling)")

        # PiT norms the class tokens only: the pool's norm, so counts match timm's as well as outputs
        pool_norm = not self.is_id(m.norm)
        if pool_norm:
            self.norm(m.norm, "norm")
        data["final_norm"] = False
        data["pool"] = {"name": "distilled" if distilled else "token", "params": {"norm": pool_norm}}
        D = stages[-1]["embed_dim"]
        data["num_classes"] = 0
        classifiers = [("head", m.head)] + ([("head_dist", m.head_dist)] if distilled else [])
        if not all(self.is_id(h) for _, h in classifiers):
            for where, h in classifiers:
                h = self.linear(h, where)
                if h.bias is None or h.in_features != D:
                    raise self.unsupported(f"classifier {where} without bias or of another width")
            if distilled and m.head.out_features != m.head_dist.out_features:
                raise self.unsupported("class and distillation heads of different sizes")
            data["num_classes"] = m.head.out_features

        data["norm"] = self.norm_selection()
        data["drop_rate"] = _fmt_float(m.head_drop.p)
        data["proj_drop_rate"] = _fmt_float(first["attn"]["proj_drop"])
        data["drop_path_rate"] = _fmt_float(blocks[-1][0]["drop_path"]) if len(blocks) > 1 else 0.0

        from ..recipes import load_spec

        return load_spec(data)


# --- spec -> timm --------------------------------------------------------------------------------

def pit_kwargs(spec: ViTSpec) -> dict[str, Any]:
    """Keyword arguments of timm's ``PoolingVisionTransformer`` (any ``pit_*`` name) for a staged spec."""
    from ..plugins import get_registry
    from .to_timm import check_uniform_blocks

    fail = functools.partial(_unsupported_spec, spec)
    check_uniform_blocks(spec, fail)
    registry = get_registry()
    for kind, (name, fixed) in PIT_SELECTIONS.items():
        sel = spec.selection(kind)
        differ = {}
        if sel.name == name:
            # every other param at the component's default: one added later (kv_heads) keeps its
            # neutral default to mean the model timm builds
            free = {k: sel.params[k] for k in PIT_FREE_PARAMS.get(kind, ()) if k in sel.params}
            want = registry.get(kind, name).cls.Params.model_validate({**fixed, **free}).model_dump(mode="json")
            differ = {k: sel.params.get(k) for k in {**want, **sel.params} if sel.params.get(k) != want.get(k)}
        if sel.name != name or differ:
            listed = lambda d: ", ".join(f"{k}={v!r}" for k, v in d.items())  # noqa: E731
            what = f"{kind} '{sel.name}'" + (f" with {listed(differ)}" if differ else "")
            raise fail(f"{what} (PiT: {name} with {listed(fixed) or 'its defaults'})")
    for plan in spec.stage_plans()[1:]:
        if (plan.transition.name, plan.transition.params.get("stride")) != ("pit_pool", 2):
            raise fail(f"stage {plan.index} transition '{plan.transition.name}' {plan.transition.params} "
                       "(PiT pools with pit_pool, stride 2)")
    pool = spec.pool
    distilled = pool.name == "distilled"
    if pool.name not in ("token", "distilled") or not spec.class_token or spec.reg_tokens != int(distilled):
        raise fail(f"pool '{pool.name}' with class_token={spec.class_token}, reg_tokens={spec.reg_tokens} "
                   "(PiT: the class token, pool 'token'; distilled: plus one distillation token, pool 'distilled')")
    if bool(pool.params.get("norm")) == spec.final_norm:
        raise fail("PiT norms the class tokens once: set either the pool's norm or final_norm")
    if spec.pre_norm or spec.dynamic_img_size or spec.pos_drop_rate:
        raise fail("pre_norm, dynamic_img_size or pos_drop_rate")
    stride = spec.patch_embed.params.get("stride")
    if stride is None:
        if spec.patch_hw[0] != spec.patch_hw[1]:
            raise fail("non-square patches without a stride (PiT's stride is one number)")
        stride = spec.patch_hw[0]
    stages = spec.stages
    return dict(
        img_size=spec.img_size if isinstance(spec.img_size, int) else tuple(spec.img_size),
        patch_size=spec.patch_size if isinstance(spec.patch_size, int) else tuple(spec.patch_size),
        stride=stride,
        base_dims=[st.embed_dim // st.num_heads for st in stages],
        depth=[st.depth for st in stages],
        heads=[st.num_heads for st in stages],
        mlp_ratio=spec.mlp_ratio,
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
        global_pool="token",
        distilled=distilled,
        drop_rate=spec.drop_rate,
        pos_drop_rate=0.0,
        proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=spec.attention.params.get("attn_drop", 0.0),
        drop_path_rate=spec.drop_path_rate,
    )


def pit_state_dict(model) -> dict[str, torch.Tensor]:
    """A staged vitlab model's weights in timm PiT's names (``PIT_NAMES`` and ``PIT_FUSED`` read back)."""
    pit_kwargs(model.spec)
    depths = [st.depth for st in model.spec.stages]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for tkey, parts in PIT_FUSED:
        present = [sd.pop(p) for p in parts if p in sd]
        if present:
            out[tkey] = torch.cat(present, dim=1)
    gh, gw = model.grid_size
    pe = sd.pop("pos_embed.weight")  # (1, gh * gw, D)
    out["pos_embed"] = pe.transpose(1, 2).reshape(1, pe.shape[2], gh, gw)  # the inverse of ``pos_table``
    for key in list(sd):
        name = NAMES.to_timm(key, depths)
        if name is not None:
            out[name] = sd.pop(key)
    if sd:  # pragma: no cover - a component with weights the table does not know
        raise WeightsError(f"no timm PiT name for: {', '.join(sorted(sd))}")
    return out


def _pit_class(spec: ViTSpec) -> type:
    from timm.models.pit import PoolingVisionTransformer

    return PoolingVisionTransformer


PIT_EXPORT = Export(claims=lambda spec: spec.stages is not None, timm_class=_pit_class, kwargs=pit_kwargs,
                    state_dict=pit_state_dict)
