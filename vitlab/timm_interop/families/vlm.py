"""timm's vision towers of vision-language models <-> ``ViTSpec``: what the three families share
(their readers and exports are ``qwen3.py``, ``deepseek.py`` and ``gemma4.py``).

Each family is an encoder -- a ViT without prefix tokens and its native projector to the language
model (Qwen's merger, DeepSeek's aligner, Gemma's soft-token pool) -- and a classifier wrapping it:
the mean over the tokens, a norm without learned weights, a linear head. vitlab reads either into
one flat spec whose pool is the projector and the classifier's pooling (``components.vlm_pool``);
the family's classifier class holds every such spec (with ``global_pool=''`` it hands out the
encoder's tokens), so that is what a spec goes back to timm as. The state-dict differences are the
``bridge`` tables ``QWEN3``, ``DEEPSEEK`` and ``GEMMA4`` (the classifier's ``encoder.`` prefix, the
projector under ``pool``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ...errors import SpecError
from ...spec import ViTSpec
from ..export import check_uniform_blocks, pair
from ..export import require as require_selections
from ..family import Exporting
from ..reader import fmt_float
from .eva import EvaReader

# the classifier holds the encoder under ``encoder.`` (its head stays ``head``); each family's
# table lists the classifier's names before the encoder's: export picks those its target has
TOWER = (("head.{rest}", "head.{rest}"),)

GRID_POOLS = ("unshuffle_mlp", "unshuffle_mlp_avg", "cell_avg")  # pools bound to the build-time grid


class TowerReader(EvaReader):
    """What the VLM towers share: the classifier wrapper (``encoder``, ``norm``, ``head``) around
    the encoder, which ``self.m`` is while its blocks are read."""

    projector_attr = ""  # the name of the encoder's projector module (in messages)

    def __init__(self, model: nn.Module, name: str, label: str, registry):
        super().__init__(model, name, label, registry)
        self.wrapper = model if hasattr(model, "encoder") else None
        self.m = model.encoder if self.wrapper is not None else model

    def norm(self, mod: nn.Module, where: str) -> None:
        from timm.layers import RmsNormFp32

        if type(mod) is RmsNormFp32:  # computes in float32 whatever the dtype: the same function in float32
            if not mod.elementwise_affine:
                raise self.unsupported(f"RmsNorm without affine weight at {where}")
            self.norms[where] = ("rmsnorm", (("eps", float(mod.eps)),))
            return
        super().norm(mod, where)

    def plain_norm(self, mod: nn.Module, where: str) -> tuple[str, float] | None:
        """A classifier norm without learned weights: ``(kind, eps)``, ``None`` for none."""
        from timm.layers import LayerNorm, RmsNorm, RmsNormFp32

        if self.is_id(mod):
            return None
        kinds = {LayerNorm: "layernorm", nn.LayerNorm: "layernorm", RmsNorm: "rmsnorm", RmsNormFp32: "rmsnorm"}
        kind = kinds.get(type(mod))
        if kind is None or mod.elementwise_affine or len(tuple(mod.normalized_shape)) != 1:
            raise self.unsupported(f"classifier norm {type(mod).__name__} other than one without weights at {where}")
        return kind, fmt_float(mod.eps)

    def projector(self) -> dict | None:
        """The encoder's native projector as an ``unshuffle_mlp`` / ``cell_avg`` selection, or None."""
        raise NotImplementedError

    def pool(self, width: int) -> tuple[dict, int]:
        """The pool selection (projector and the classifier's pooling) and ``num_classes``."""
        proj, w = self.projector(), self.wrapper
        if w is None:  # the encoder alone: projector tokens, a plain mean, or raw tokens
            if proj is not None:
                return proj, 0
            return ({"name": "avg", "params": {"norm": False}} if self.m.global_pool == "avg" else {"name": "none"}), 0
        if w.global_pool not in ("avg", "", "none"):
            raise self.unsupported(f"classifier global_pool '{w.global_pool}'")
        classes = self.head(width if proj is None else self.tokens_width(proj, width))
        std = self.plain_norm(w.norm, "norm")
        if w.global_pool != "avg":  # every token to the head
            if std is not None:
                raise self.unsupported("classifier norm without weights on every token (global_pool='')")
            return proj or {"name": "none"}, classes
        if proj is None:
            if std is None:
                return {"name": "avg", "params": {"norm": False}}, classes
            return {"name": "avg_std", "params": {"norm": std[0], "eps": std[1]}}, classes
        if proj["name"] != "unshuffle_mlp":
            raise self.unsupported(f"the mean over {proj['name']} tokens (encoder_pool='{w.encoder_pool}')")
        out_norm = {"out_norm": None} if std is None else {"out_norm": std[0], "out_eps": std[1]}
        return {"name": "unshuffle_mlp_avg", "params": {**proj["params"], **out_norm}}, classes

    @staticmethod
    def tokens_width(proj: dict, dim: int) -> int:
        """The width of a projector's tokens on ``dim``-wide patches."""
        p = proj["params"]
        if proj["name"] == "cell_avg":
            return dim
        return p.get("out_features") or p.get("hidden") or p["merge_size"] ** 2 * dim

    def head(self, width: int) -> int:
        """Classes of the classifier's ``head`` over ``width`` features (0 without one)."""
        head = self.wrapper.head
        if self.is_id(head):
            return 0
        head = self.linear(head, "head")
        if head.bias is None or head.in_features != width:
            raise self.unsupported("classifier head without bias or of another width")
        return head.out_features

    def uniform(self, blocks: list[dict]) -> dict:
        """The first block's reading, every block being read alike."""
        for i, b in enumerate(blocks[1:], start=1):
            if b.settings() != blocks[0].settings():
                raise self.unsupported(f"blocks that differ (block {i} is not configured like block 0)")
        return blocks[0]

    def finish(self, data: dict[str, Any], blocks: list[dict]) -> ViTSpec:
        first = self.uniform(blocks)
        data["mlp_ratio"] = self.mlp_ratio(first.mlp["hidden"], "blocks.0.mlp")
        data["pool"], data["num_classes"] = self.pool(self.m.embed_dim)
        data.update(
            depth=len(blocks), embed_dim=self.m.embed_dim, num_heads=first.attn["heads"], class_token=False,
            reg_tokens=0, pre_norm=False, dynamic_img_size=data["pool"]["name"] not in GRID_POOLS,
            attention={"name": first.attn["name"], "params": first.attn["params"]},
            mlp={"name": first.mlp["name"], "params": first.mlp["params"]}, block=first.block,
            norm=self.norm_selection(), pos_drop_rate=0.0,
            drop_rate=fmt_float(self.wrapper.head_drop.p) if self.wrapper is not None else 0.0,
            proj_drop_rate=fmt_float(first.attn["proj_drop"]),
            drop_path_rate=fmt_float(blocks[-1].drop_path) if len(blocks) > 1 else 0.0)
        return self.validated(data)


class RopeTowerReader(TowerReader):
    """Qwen3-VL and DeepSeek: timm's ``PatchEmbed`` and ``RotaryEmbeddingCat``, EVA-style blocks, and
    a pixel-unshuffle projector (``merger`` / ``aligner``)."""

    order = ""  # a merged cell's channel order (``unshuffle_mlp``)

    def unshuffle(self, proj: nn.Module, k: int, norm: nn.Module | None) -> dict:
        where = self.projector_attr
        D = self.m.embed_dim
        fc1 = self.linear(proj.fc1, f"{where}.fc1")
        fc2 = None if self.is_id(proj.fc2) else self.linear(proj.fc2, f"{where}.fc2")
        if fc1.bias is None or (fc2 is not None and fc2.bias is None) or fc1.in_features != k * k * D:
            raise self.unsupported(f"projector without biases or of another input width at {where}")
        if norm is not None:
            self.norm(norm, f"{where}.norm")
        params = {"merge_size": k, "order": self.order, "norm": norm is not None,
                  "hidden": None if fc1.out_features == k * k * D else fc1.out_features,
                  "out_features": None if fc2 is None else fc2.out_features,
                  "act": self.act(proj.act, f"{where}.act")}
        return {"name": "unshuffle_mlp", "params": params}

    def read(self, block: Callable[[nn.Module, int], dict]) -> ViTSpec:
        m = self.m
        if m.num_prefix_tokens:
            raise self.unsupported("prefix tokens")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        blocks = [block(b, i) for i, b in enumerate(m.blocks)]
        if not blocks:
            raise self.unsupported("model without blocks")
        rope = self.rope(blocks[0].attn["rotate_half"])
        if rope is None:
            raise self.unsupported("encoder without RoPE")
        data["pos_embed"] = self.positions(rope)
        final = not self.is_id(getattr(m, "norm", None))
        if final:
            self.norm(m.norm, "norm")
        data["final_norm"] = final
        return self.finish(data, blocks)


# --- spec -> timm --------------------------------------------------------------------------------

def require(spec: ViTSpec, ex: Exporting, fail: Callable[[str], SpecError], fixed: dict[str, tuple[str, dict]],
            free: dict[str, tuple[str, ...]]) -> None:
    """Each ``kind`` of ``fixed`` must select ``(name, params)`` with every other param at its
    default, except the ``free`` ones (which timm takes as arguments); uniform blocks."""
    check_uniform_blocks(spec, fail)
    require_selections(spec, ex.registry, fail, fixed, free, "timm's")
    if spec.stages is not None or spec.class_token or spec.reg_tokens or spec.pre_norm or spec.pos_drop_rate:
        raise fail("stages, prefix tokens, pre_norm or pos_drop_rate")


def pool_kwargs(spec: ViTSpec, fail: Callable[[str], SpecError], projector: str, eps: float,
                norm: str, merge: Callable[[dict], dict]) -> dict[str, Any]:
    """The classifier's pooling arguments for ``spec.pool`` (``encoder_pool=projector`` for the
    projector's pools; ``merge(params)`` its own arguments); its norm must be ``norm`` with ``eps``."""
    p, name = spec.pool.params, spec.pool.name
    std = {"avg_std": (p.get("norm"), p.get("eps")), "unshuffle_mlp_avg": (p.get("out_norm"), p.get("out_eps"))}
    kind, std_eps = std.get(name, (None, None))
    if kind is not None and (kind, std_eps) != (norm, eps):
        raise fail(f"pool norm {kind} with eps {std_eps} (timm's classifier: {norm} with the model's eps {eps})")
    if name == "avg" and not p.get("norm"):
        return {"global_pool": "avg", "final_norm": False}
    if name == "avg_std":
        return {"global_pool": "avg", "final_norm": True}
    if name == "none":
        return {"global_pool": "", "final_norm": False}
    if name in ("unshuffle_mlp", "unshuffle_mlp_avg"):
        reduce = name == "unshuffle_mlp_avg"
        return {"global_pool": "avg" if reduce else "", "encoder_pool": projector, "final_norm": kind is not None,
                **merge(p)}
    raise fail(f"pool '{name}' {p}")


def merge_check(spec: ViTSpec, fail: Callable[[str], SpecError], p: dict, order: str, pad: bool) -> int:
    """The merge size of an ``unshuffle_mlp`` in timm's layout (``order``, GELU; ``pad``: timm pads
    the grid, else it must divide)."""
    k = p["merge_size"]
    if p["order"] != order or p["act"] != "gelu":
        raise fail(f"merged channels in '{p['order']}' order with {p['act']} (timm's: '{order}', gelu)")
    gh, gw = spec.build_context().grid_size
    if not pad and (gh % k or gw % k):
        raise fail(f"a {gh}x{gw} patch grid the merger's {k} x {k} cells do not divide")
    return k


def common_kwargs(spec: ViTSpec) -> dict[str, Any]:
    """The classifier arguments every tower takes the same way."""
    return dict(img_size=pair(spec.img_size),
                patch_size=spec.patch_size, in_chans=spec.in_chans, num_classes=spec.num_classes,
                embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads, drop_rate=spec.drop_rate,
                proj_drop_rate=spec.proj_drop_rate, attn_drop_rate=spec.attention.params.get("attn_drop", 0.0),
                drop_path_rate=spec.drop_path_rate)
