"""timm's ``HieraDet`` (SAM 2's Hiera image encoder, Ravi et al. 2024; ``hieradet_sam2``) <-> a
staged vitlab spec.

HieraDet is Hiera (``families.hiera``) kept on the grid (NHWC) rather than unrolled: the same
``conv_padded`` stem, ``q_pool`` transitions (timm's first block of each later stage) and head (an
average pool, normed, then the classifier), with three differences:

* each stage has its own window side (``window_spec``), not a mask unit shrunk by every pool: a
  block attends in ``window`` windows of its stage's side, zero-padded to whole windows, or globally
  (``mhsa``) when timm lists it in ``global_att_blocks`` (written as ``layers``); the block opening
  a stage attends in the windows of the stage before it;
* the position embedding is always ``abswin`` without antialiasing (its window table is stage 0's
  window);
* HieraDet takes any image size (``dynamic_img_size``) and keeps none: the spec's ``img_size`` is the
  model's default input size (``pretrained_cfg``), else 224.

The checkpoints name their blocks as Hiera's: the ``HIERA`` table reads them, and export writes
back through the same ``staged_state_dict``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...spec import ViTSpec
from ..export import norm_layer, refuser
from ..family import Exporting, TimmFamily
from .hiera import HIERA, HieraReader, differs, pooling_and_widths, staged_state_dict, uses_q_pool


def _square(pair, what: str, where: str, fail) -> int:
    if pair[0] != pair[1]:
        raise fail(f"non-square {what} {tuple(pair)} at {where}")
    return int(pair[0])


# --- timm -> spec ------------------------------------------------------------------------------------

class HieraDetReader(HieraReader):
    """Reads a timm ``HieraDet`` (its modules and shapes, never its name)."""

    @staticmethod
    def heads_of(a: nn.Module) -> int:
        return a.num_heads

    def stages(self, m: nn.Module, q_side: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
        """The stages, each vitlab block's attention and MLP read (in order)."""
        from timm.models.hieradet_sam2 import MultiScaleBlock

        stages, attns, mlps, start = [], [], [], 0
        for s, end in enumerate(m.stage_ends):
            stage: dict[str, Any] = {}
            for i in range(start, end + 1):
                b, where = m.blocks[i], f"blocks.{i}"
                if type(b) is not MultiScaleBlock:
                    raise self.unsupported(f"block type {type(b).__name__} at {where}")
                mlp, ls = self.block_parts(b, where)
                window = _square(b.window_size, "window", where, self.unsupported) if b.is_windowed else 0
                stride = _square(b.q_stride, "q_stride", where, self.unsupported) if b.q_stride else 1
                if s and i == start:  # the block opening the stage: the transition into it
                    if b.dim == b.dim_out:
                        raise self.unsupported(f"a stage that keeps the width at {where}")
                    self.linear(b.proj, f"{where}.proj")
                    self.pooled_attention(b.attn, f"{where}.attn", b.dim_out, stride, window)
                    stage = {"embed_dim": b.dim_out, "num_heads": b.attn.num_heads, "transition": {
                        "name": "q_pool", "params": {"stride": stride, "window_size": window, "residual": "proj",
                                                     "init_values": ls}}}
                    mlps.append(("transition", mlp, b.dim_out, where))
                    continue
                if b.dim != b.dim_out or stride != 1:
                    raise self.unsupported(f"a width change or pooling inside a stage at {where}")
                attns.append(self.pooled_attention(b.attn, f"{where}.attn", b.dim_out, 1, window))
                mlps.append((ls, mlp, b.dim_out, where))
                if i == start:
                    stage = {"embed_dim": b.dim_out, "num_heads": b.attn.num_heads}
            if end - start + 1 - (s > 0) < 1:
                raise self.unsupported(f"stage {s} with no block besides the one that opens it")
            stages.append({"depth": end - start + 1 - (s > 0), **stage})
            start = end + 1
        return stages, attns, mlps

    def positions(self) -> dict:
        m = self.m
        w = _square(m.pos_embed_window.shape[-2:], "window position table", "pos_embed_window", self.unsupported)
        return {"name": "abswin", "params": {"global_size": list(m.pos_embed.shape[-2:]), "window_size": w,
                                             "antialias": False}}

    def spec(self) -> ViTSpec:
        from timm.models.hieradet_sam2 import HieraDet, HieraPatchEmbed

        m = self.m
        if type(m) is not HieraDet:
            raise self.unsupported(f"HieraDet subclass {type(m).__name__}")
        if type(m.patch_embed) is not HieraPatchEmbed:
            raise self.unsupported("a non-overlapping, padded patch embedding (patch_size)")
        size = (getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        data: dict[str, Any] = {"name": self.name, **self.conv_stem(m.patch_embed.proj), "class_token": False,
                                "reg_tokens": 0, "pos_embed": self.positions(), "pre_norm": False,
                                "transition": {"name": "q_pool"}, "dynamic_img_size": True,
                                "img_size": [int(v) for v in size[-2:]]}
        stages, attns, mlps = self.stages(m)
        data.update(self.head(stages[-1]["embed_dim"]))
        return self.finish_stages(data, stages, attns, mlps)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return uses_q_pool(spec) and spec.pos_embed.name == "abswin" and not spec.pos_embed.params.get("antialias", True)


def _windows(spec: ViTSpec, ex: Exporting, fail) -> tuple[list[int], list[int]]:
    """``window_spec`` and ``global_att_blocks``: each stage's one window side (of its blocks and of
    the transition out of it; 0 where all attend globally) and timm's indices of the blocks that
    attend globally in a windowed stage."""
    plans, stages = spec.block_plans(), spec.stage_plans()
    attends: list[tuple[int, int]] = []  # timm's blocks in order: (stage whose window, window or 0)
    for st in stages:
        if st.index:  # the opening block attends in the windows of the stage before
            t = st.transition.params
            if t["stride"] > 1 and not t["window_size"]:  # timm divides by the pooled window
                raise fail(f"a q_pool transition into stage {st.index} that pools and attends globally")
            attends.append((st.index - 1, t["window_size"]))
        for i in st.blocks:
            p, sel = plans[i], plans[i].selections["attention"]
            if any(p.selections[k] != spec.selection(k) for k in ("mlp", "norm", "block")) or p.mlp_ratio != 4.0:
                raise fail(f"per-block overrides other than attention, or an MLP ratio other than 4 (block {i})")
            if sel.name not in ("window", "mhsa") or differs(ex.registry, "attention", sel, {"window_size"}):
                raise fail(f"attention {sel.name} {sel.params} at block {i} (HieraDet: window or mhsa with their "
                           "defaults)")
            attends.append((st.index, sel.params["window_size"] if sel.name == "window" else 0))
    window_spec = []
    for s in range(len(stages)):
        sides = {w for t, w in attends if t == s and w}
        if len(sides) > 1:
            raise fail(f"windows {sorted(sides)} in stage {s} (HieraDet: one window side per stage)")
        window_spec.append(sides.pop() if sides else 0)
    table = spec.pos_embed.params["window_size"]
    if window_spec[0] not in (0, table):
        raise fail(f"stage 0's window {window_spec[0]} other than abswin's window table {table}")
    window_spec[0] = table
    return window_spec, [i for i, (s, w) in enumerate(attends) if not w and window_spec[s]]


def hieradet_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``HieraDet`` for a staged spec with ``q_pool`` transitions and an
    ``abswin`` position embedding without antialiasing."""
    fail = refuser(spec, "HieraDet")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or spec.final_norm:
        raise fail("prefix tokens, pre_norm or a final norm (HieraDet: none; the head norms)")
    if spec.pool.name != "avg" or not spec.pool.params.get("norm") or spec.block.name != "prenorm":
        raise fail(f"pool '{spec.pool.name}' or block '{spec.block.name}' (HieraDet: avg with its norm, prenorm)")
    pe, mlp, plans = spec.patch_embed, spec.mlp, spec.stage_plans()
    if pe.name != "conv_padded" or not pe.params.get("bias", True):
        raise fail(f"patch embedding '{pe.name}' (HieraDet: conv_padded with bias)")
    if mlp.name != "mlp" or differs(ex.registry, "mlp", mlp, {"act"}):
        raise fail(f"mlp '{mlp.name}' {mlp.params} (HieraDet: mlp with biases)")
    window_spec, global_blocks = _windows(spec, ex, fail)
    q, q_pool, dim_mul, head_mul = pooling_and_widths(spec, fail)
    trans = [p.transition.params for p in plans[1:]]
    if {t["residual"] for t in trans} != {"proj"} or len({t["init_values"] for t in trans} | {
            spec.block.params.get("init_values")}) != 1:
        raise fail("a pooled residual, or layer scales that differ between transitions and blocks")
    g = spec.pos_embed.params["global_size"]
    return dict(
        in_chans=spec.in_chans, num_classes=spec.num_classes, global_pool="avg", embed_dim=plans[0].embed_dim,
        num_heads=plans[0].num_heads, patch_kernel=tuple(spec.patch_hw), patch_stride=(pe.params["stride"],) * 2,
        patch_padding=(pe.params["padding"],) * 2, q_pool=q_pool, q_stride=(q, q),
        stages=tuple(p.depth + (p.index > 0) for p in plans), dim_mul=dim_mul, head_mul=head_mul,
        global_pos_size=tuple(g) if isinstance(g, (list, tuple)) else (g, g), window_spec=tuple(window_spec),
        global_att_blocks=tuple(global_blocks), init_values=trans[0]["init_values"], drop_rate=spec.drop_rate,
        drop_path_rate=spec.drop_path_rate, norm_layer=norm_layer(spec, fail), act_layer=mlp.params.get("act", "gelu"),
    )


FAMILY = TimmFamily(
    "hieradet_sam2", classes=("timm.models.hieradet_sam2.HieraDet",), reader=HieraDetReader, claims=_claims,
    timm_class="timm.models.hieradet_sam2.HieraDet", kwargs=hieradet_kwargs, state_dict=staged_state_dict,
    unkept=("img_size", "dynamic_img_size"), tables=(HIERA,),
)
