"""timm's ``PoolingVisionTransformer`` (PiT, Heo et al. 2021) <-> a staged vitlab spec.

PiT is a vitlab model with ``stages``: an overlapping ``conv`` patch embedding (``stride``), a
learned position table over the patches only, ``pit_pool`` transitions (stride 2) and the class
token(s) normed after pooling; the distilled variants add a distillation token (vitlab's first
register token) and the ``distilled`` pool. The parameter names are one table, ``PIT``, that
loading reads from timm to vitlab and exporting reads back.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import check_uniform_blocks, refuser, require
from ..family import Exporting, TimmFamily
from ..reader import Reader, fmt_float
from ..sources import Source


class PitNames(Family):
    """PiT's names, and what they cannot say: the position table is an image (1, D, gh, gw), seen
    as vitlab's rows (1, gh * gw, D); the distilled models keep the class and distillation tokens
    in one ``cls_token`` (1, 2, D), vitlab's ``cls_token`` and ``reg_token``."""

    def adapt(self, src: Source, depths: Sequence[int] | None = None) -> Source:
        out = super().adapt(src, depths)
        shapes, converted = dict(out.shapes), dict(out.converted)
        pe, cls = shapes.get("pos_embed", ()), shapes.get("cls_token", ())
        if len(pe) == 4 and pe[0] == 1:
            shapes["pos_embed"] = (1, pe[2] * pe[3], pe[1])
            converted["pos_embed"] = "the (1, D, gh, gw) image reshaped to rows"
        if len(cls) == 3 and cls[1] > 1:
            shapes.update(cls_token=(1, 1, cls[2]), reg_token=(1, cls[1] - 1, cls[2]))
            converted.update(cls_token="tokens 0:1 of the checkpoint's cls_token",
                             reg_token=f"tokens 1:{cls[1]} of the checkpoint's cls_token")

        def get(k: str) -> torch.Tensor:
            if k == "pos_embed" and len(pe) == 4:
                return out.get(k).flatten(2).transpose(1, 2)  # (1, D, gh, gw) -> (1, gh * gw, D)
            if k in ("cls_token", "reg_token") and len(cls) == 3 and cls[1] > 1:
                tokens = out.get("cls_token")
                return tokens[:, :1] if k == "cls_token" else tokens[:, 1:]
            return out.get(k)

        layout = (0, tuple(pe[2:])) if len(pe) == 4 else None
        return out.replaced(shapes, get, pos_layout=layout, converted=converted)

    def restore(self, sd, lead=None, *, grid: tuple[int, int] = (0, 0), **kw) -> dict[str, torch.Tensor]:
        sd = dict(sd)
        tokens = [sd.pop(k) for k in ("cls_token", "reg_token") if k in sd]
        pe = sd.pop("pos_embed.weight")  # (1, gh * gw, D)
        out = super().restore(sd, lead, **kw)
        out["cls_token"] = torch.cat(tokens, dim=1)
        out["pos_embed"] = pe.transpose(1, 2).reshape(1, pe.shape[2], *grid)  # rows -> (1, D, gh, gw)
        return out


# timm PiT name <-> vitlab name. ``{stage}`` is the stage, ``{j}`` a block within it and ``{block}``
# the same block counted across the whole model. PiT norms the class tokens after the last stage:
# the pool's norm in a spec read from timm, the final norm in one that norms every token (same
# function; the loader moves it there when the model's pool has none).
PIT = PitNames(
    "pit", marker=r"(transformers\.|patch_embed\.conv\.)",
    renames=(("patch_embed.conv.{rest}", "patch_embed.proj.{rest}"),
             ("transformers.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
             ("transformers.{stage}.pool.{rest}", "transitions.{stage}.{rest}"),
             ("norm.{rest}", "pool.norm.{rest}"), ("norm.{rest}", "norm.{rest}"),
             ("head_dist.{rest}", "head.dist.{rest}")),
)


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


# --- timm -> spec --------------------------------------------------------------------------------

class PitReader(Reader):
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
            heads = read[0].attn["heads"]
            stages.append({"depth": len(read), "embed_dim": width, "num_heads": heads, **stage})
            blocks += [(b, width, heads) for b in read]

        first, w0, _ = blocks[0]
        ratio = self.mlp_ratio(first.mlp["hidden"], "transformers.0.blocks.0.mlp", w0)
        for i, (b, w, heads) in enumerate(blocks):
            # alike but for what differs between stages (width, heads) or blocks (drop path)
            alike = b.settings(attn=("heads",), mlp=("hidden",)) == first.settings(attn=("heads",), mlp=("hidden",))
            if not alike or b.attn["heads"] != heads:
                raise self.unsupported(f"blocks that differ (block {i} is not configured like block 0)")
            if int(w * ratio) != b.mlp["hidden"]:
                raise self.unsupported(f"MLP ratio that differs between stages (block {i})")
        data.update(stages=stages, mlp_ratio=ratio, attention={"name": "mhsa", "params": first.attn["params"]},
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]}, block=first.block)

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
        data["drop_rate"] = fmt_float(m.head_drop.p)
        data["proj_drop_rate"] = fmt_float(first.attn["proj_drop"])
        data["drop_path_rate"] = fmt_float(blocks[-1][0].drop_path) if len(blocks) > 1 else 0.0

        return self.validated(data)


# --- spec -> timm --------------------------------------------------------------------------------

def pit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``PoolingVisionTransformer`` (any ``pit_*`` name) for a staged spec."""
    fail = refuser(spec, "PoolingVisionTransformer")
    check_uniform_blocks(spec, fail)
    require(spec, ex.registry, fail, PIT_SELECTIONS, PIT_FREE_PARAMS, "PiT")
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


def pit_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A staged vitlab model's weights in timm PiT's names (``PIT`` read backwards)."""
    pit_kwargs(model.spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return PIT.restore(sd, grid=tuple(model.grid_size), depths=[st.depth for st in model.spec.stages])


FAMILY = TimmFamily(
    "pit", classes=("timm.models.pit.PoolingVisionTransformer",), reader=PitReader,
    claims=lambda spec: spec.stages is not None,
    timm_class="timm.models.pit.PoolingVisionTransformer", kwargs=pit_kwargs,
    state_dict=pit_state_dict, tables=(PIT,),
)
