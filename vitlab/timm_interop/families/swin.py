"""timm's ``SwinTransformer`` (Swin v1, Liu et al. 2021; ``swin_transformer``) <-> a staged vitlab spec.

Swin is a vitlab model with ``stages``: a ``conv`` patch embedding with a norm, no position
embedding and no prefix tokens, ``patch_merge`` transitions into every stage after the first, and
blocks that attend in windows (``window`` with ``rel_pos: table``) whose odd blocks in each stage
are shifted by half a window (written as ``layers``, e.g. ``at: "1-9:2"``); the final norm over
every token and an average pool feed the classifier. Window size, heads and MLP ratio may differ
per stage. The state-dict differences are the ``SWIN`` table: timm keeps blocks and patch merging
per stage (``layers.{stage}.blocks.{j}``, ``layers.{stage}.downsample``) and the classifier as
``head.fc``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...components.window import effective_shift
from ...layout import format_indices
from ...sizes import as_pair
from ...spec import ViTSpec
from ..bridge import Family
from ..export import norm_layer, pair, refuser
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, Reader, common_and_layers, fmt_float

SWIN = Family(
    "swin", marker=r"layers\.\d+\.blocks\.\d+\.",
    renames=(("layers.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
             ("layers.{stage}.downsample.{rest}", "transitions.{stage}.{rest}"),
             ("head.fc.{rest}", "head.{rest}")),
)

# what every Swin block is apart from its window, shift and width: kind -> (component, params)
_FIXED: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {"act": "gelu", "bias": True, "norm": False}),
    "block": ("prenorm", {"init_values": None, "attn_only_layer_scale": False}),
    "pos_embed": ("none", {}),
    "pool": ("avg", {"norm": False}),
}


def at_text(indices: list[int]) -> str:
    """Block indices as ``at``: one stepped range when they are one (``"1-9:2"``), else ranges."""
    steps = {b - a for a, b in zip(indices, indices[1:])}
    if len(indices) > 2 and len(steps) == 1 and (step := steps.pop()) > 1:
        return f"{indices[0]}-{indices[-1]}:{step}"
    return format_indices(indices)


# --- timm -> spec ------------------------------------------------------------------------------------

class SwinReader(Reader):
    """Reads a timm ``SwinTransformer`` instance (its modules and shapes, never its name)."""

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.models.swin_transformer import WindowAttention

        if type(a) is not WindowAttention:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if qkv.out_features != 3 * dim or proj.in_features != dim or proj.out_features != dim:
            raise self.unsupported(f"attention width other than the stage's {dim} (head_dim) at {where}")
        wh, ww = a.window_size
        if wh != ww:
            raise self.unsupported(f"{wh}x{ww} windows (vitlab's windows are square) at {where}")
        return {"heads": a.num_heads, "proj_drop": a.proj_drop.p, "name": "window",
                "params": {"qkv_bias": qkv.bias is not None, "proj_bias": proj.bias is not None,
                           "attn_drop": fmt_float(a.attn_drop.p), "window_size": int(wh), "rel_pos": "table"}}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        """A Swin block: pre-norm, window attention shifted by ``shift_size`` (0 where the grid
        fits in one window, as vitlab's ``window`` does, unless ``always_partition``)."""
        from timm.models.swin_transformer import SwinTransformerBlock

        attn, mlp = self.parts(b, where, types=(SwinTransformerBlock,), dim=dim)
        w, shift = attn["params"]["window_size"], tuple(int(s) for s in b.shift_size)
        if effective_shift(tuple(b.input_resolution), w, shift) != shift:
            raise self.unsupported(f"a shift on a grid that fits in one window (always_partition) at {where}")
        attn["params"]["shift"] = shift[0] if shift[0] == shift[1] else list(shift)
        return BlockRead(attn, mlp, {"name": "prenorm", "params": {"init_values": None}},
                         float(getattr(b.drop_path1, "drop_prob", 0.0)))

    def transition(self, down: nn.Module, s: int, in_dim: int) -> tuple[int, dict]:
        from timm.models.swin_transformer import PatchMerging

        where = f"layers.{s}.downsample"
        if type(down) is not PatchMerging:
            raise self.unsupported(f"stage transition {type(down).__name__} at {where}")
        red = self.linear(down.reduction, f"{where}.reduction")
        if red.bias is not None or red.in_features != 4 * in_dim:
            raise self.unsupported(f"patch merging reduction with a bias or of another width at {where}")
        self.norm(down.norm, f"{where}.norm")
        return red.out_features, {"name": "patch_merge"}

    def head(self) -> dict:
        from timm.layers import ClassifierHead

        head = self.m.head
        if type(head) is not ClassifierHead or head.global_pool.pool_type != "avg" or head.use_conv:
            raise self.unsupported(f"head other than an average pool and a linear classifier "
                                   f"(global_pool '{self.m.global_pool}')")
        num_classes = 0
        if not self.is_id(head.fc):
            fc = self.linear(head.fc, "head.fc")
            if fc.bias is None:
                raise self.unsupported("classifier head without bias")
            num_classes = fc.out_features
        return {"num_classes": num_classes, "drop_rate": fmt_float(head.drop.p)}

    def spec(self) -> ViTSpec:
        from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage

        m = self.m
        if type(m) is not SwinTransformer:
            raise self.unsupported(f"SwinTransformer subclass {type(m).__name__}")
        if m.dynamic_img_size:
            raise self.unsupported("dynamic_img_size (strict_img_size=False)")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed(), "class_token": False, "reg_tokens": 0,
                                "pos_embed": {"name": "none"}, "pool": {"name": "avg"}, "pre_norm": False,
                                "transition": {"name": "patch_merge"}}
        width, stages, blocks = m.embed_dim, [], []
        for s, layer in enumerate(m.layers):
            if type(layer) is not SwinTransformerStage:
                raise self.unsupported(f"stage {type(layer).__name__} at layers.{s}")
            stage: dict[str, Any] = {}
            if s == 0:
                if not self.is_id(layer.downsample):
                    raise self.unsupported("patch merging before the first stage")
            else:
                width, stage["transition"] = self.transition(layer.downsample, s, width)
            if not len(layer.blocks):
                raise self.unsupported(f"stage {s} without blocks")
            read = [self.block(b, len(blocks) + j, width, f"layers.{s}.blocks.{j}") for j, b in enumerate(layer.blocks)]
            heads = read[0].attn["heads"]
            stages.append({"depth": len(read), "embed_dim": width, "num_heads": heads, **stage})
            blocks += [(b, width, f"layers.{s}.blocks.{j}") for j, b in enumerate(read)]

        first = blocks[0][0]
        for i, (b, _, where) in enumerate(blocks):
            if b.settings(attn=("heads", "params"), mlp=("hidden",)) != first.settings(attn=("heads", "params"),
                                                                                    mlp=("hidden",)):
                raise self.unsupported(f"blocks that differ other than in window, shift or width ({where})")
        data["attention"], layers = common_and_layers([{"name": "window", "params": b.attn["params"]} for b, _, _ in blocks],
                                                      "attention", at_text)
        ratios = [self.mlp_ratio(b.mlp["hidden"], f"{where}.mlp", w) for b, w, where in blocks]
        data["mlp_ratio"], ratio_layers = common_and_layers(ratios, "mlp_ratio", at_text)
        data.update(stages=stages, layers=layers + ratio_layers, final_norm=not self.is_id(m.norm),
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]}, block=first.block)
        if data["final_norm"]:
            self.norm(m.norm, "norm")
        data.update(self.head())
        data["norm"] = self.norm_selection()
        data["proj_drop_rate"] = fmt_float(first.attn["proj_drop"])
        data["drop_path_rate"] = fmt_float(blocks[-1][0].drop_path) if len(blocks) > 1 else 0.0
        return self.validated(data)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return spec.stages is not None and all(p.transition.name == "patch_merge" for p in spec.stage_plans()[1:])


def swin_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``SwinTransformer`` (any ``swin_*`` v1 name) for a staged spec."""
    fail = refuser(spec, "SwinTransformer")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or not spec.final_norm or spec.dynamic_img_size:
        raise fail("prefix tokens, pre_norm, dynamic_img_size or no final norm (Swin: none, none, no, a final norm)")
    pe = spec.patch_embed
    if (pe.name != "conv" or not pe.params.get("norm") or not pe.params.get("bias", True) or pe.params.get("pad")
            or pe.params.get("stride") not in (None, *spec.patch_hw)):
        raise fail(f"patch embedding '{pe.name}' {pe.params} (Swin: a conv with bias, then the norm)")
    for kind, (name, fixed) in _FIXED.items():
        sel = spec.selection(kind)
        if sel.name != name or any(sel.params.get(k, v) != v for k, v in fixed.items()):
            raise fail(f"{kind} '{sel.name}' {sel.params} (Swin: {name} {fixed})")
    contexts, plans = spec.stage_contexts(ex.registry, device="meta"), spec.block_plans()
    windows, ratios, attn = [], [], set()
    for stage in spec.stage_plans():
        grid = contexts[stage.index].grid_size
        mine = [plans[i] for i in stage.blocks]
        sels = [p.selections["attention"] for p in mine]
        if any(p.selections[k] != spec.selection(k) for p in mine for k in ("mlp", "norm", "block")):
            raise fail(f"per-block overrides other than attention and mlp_ratio (stage {stage.index})")
        if any(s.name != "window" or s.params["rel_pos"] != "table" for s in sels):
            raise fail(f"attention other than window with rel_pos: table (stage {stage.index})")
        w = sels[0].params["window_size"]
        if w > max(grid) or any(s.params["window_size"] != w for s in sels):
            raise fail(f"window sizes that differ within stage {stage.index}, or exceed its {grid[0]}x{grid[1]} grid")
        for j, s in enumerate(sels):  # timm shifts the odd blocks of a stage by half a window
            want = effective_shift(grid, w, (w // 2, w // 2) if j % 2 else (0, 0))
            if effective_shift(grid, w, as_pair(s.params["shift"])) != want:
                raise fail(f"shift {s.params['shift']} at block {stage.start + j} (Swin: 0 on even blocks of a "
                           f"stage, window_size // 2 on odd ones)")
            attn.add(tuple(sorted((k, v) for k, v in s.params.items() if k not in ("window_size", "shift"))))
        if len({p.mlp_ratio for p in mine}) != 1:
            raise fail(f"MLP ratios that differ within stage {stage.index}")
        windows.append(w)
        ratios.append(mine[0].mlp_ratio)
    if len(attn) != 1:
        raise fail("attention params (biases, dropout) that differ between blocks")
    widths = [st.embed_dim for st in spec.stages]
    if widths != [widths[0] * 2**i for i in range(len(widths))]:  # timm's num_features takes one int
        raise fail(f"stage widths {widths} (Swin doubles the width at every stage)")
    ap = dict(attn.pop())
    if ap.get("kv_heads") is not None or ap["qk_norm"] or not ap["proj_bias"]:
        raise fail("attention with kv_heads, qk_norm or without output bias")
    return dict(
        img_size=pair(spec.img_size), patch_size=pair(spec.patch_size), in_chans=spec.in_chans,
        num_classes=spec.num_classes, global_pool="avg", embed_dim=widths[0],
        depths=tuple(st.depth for st in spec.stages), num_heads=tuple(st.num_heads for st in spec.stages),
        window_size=tuple(windows), mlp_ratio=tuple(ratios), qkv_bias=ap["qkv_bias"], drop_rate=spec.drop_rate,
        proj_drop_rate=spec.proj_drop_rate, attn_drop_rate=ap.get("attn_drop", 0.0),
        drop_path_rate=spec.drop_path_rate, norm_layer=norm_layer(spec, fail),
    )


def swin_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A staged vitlab Swin's weights in timm's names (``SWIN`` read backwards)."""
    swin_kwargs(model.spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return SWIN.restore(sd, depths=[st.depth for st in model.spec.stages])


FAMILY = TimmFamily(
    "swin_transformer", classes=("timm.models.swin_transformer.SwinTransformer",), reader=SwinReader,
    claims=_claims, timm_class="timm.models.swin_transformer.SwinTransformer", kwargs=swin_kwargs,
    state_dict=swin_state_dict, tables=(SWIN,),
)
