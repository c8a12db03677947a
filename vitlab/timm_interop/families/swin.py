"""timm's ``SwinTransformer`` (Swin v1, Liu et al. 2021; ``swin_transformer``) <-> a staged vitlab spec.

Swin is a vitlab model with ``stages``: a ``conv`` patch embedding with a norm, no position
embedding and no prefix tokens, ``patch_merge`` transitions into every stage after the first, and
blocks that attend in windows (``window`` with ``rel_pos: table``) whose odd blocks in each stage
are shifted by half a window (written as ``layers``, e.g. ``at: "1-9:2"``); the final norm over
every token and an average pool feed the classifier. Window size, heads and MLP ratio may differ
per stage. The state-dict differences are the ``SWIN`` table: timm keeps blocks and patch merging
per stage (``layers.{stage}.blocks.{j}``, ``layers.{stage}.downsample``) and the classifier as
``head.fc``.

``SwinReader`` and ``stage_windows`` are what the Swin v2 families (``swin_v2``, ``swin_v2_cr``)
share with v1: the walk over stages, shifted-window blocks and patch merging, parametrised by the
timm classes they match, and the checks of a spec's stages and windows on the way back.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...components.window import effective_shift
from ...sizes import as_pair
from ...spec import ViTSpec
from ..bridge import Family
from ..export import norm_layer, pair, refuser
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, fmt_float
from ..staged import StagedReader, drop_path_of, staged_state_dict
from ..staged import at_text  # noqa: F401 - nest's and hiera's readers import it from here

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
# per-block attention params a stage may set: the rest must be one set for the whole model
PER_STAGE = ("window_size", "shift", "pretrained_window_size")


# --- timm -> spec ------------------------------------------------------------------------------------

class SwinReader(StagedReader):
    """Reads a timm ``SwinTransformer`` instance (its modules and shapes, never its name). The v2
    readers subclass it with their own classes, attention and block kind."""

    timm_module = "timm.models.swin_transformer"
    model_cls, stage_cls, block_cls = "SwinTransformer", "SwinTransformerStage", "SwinTransformerBlock"
    attn_cls, merge_cls = "WindowAttention", "PatchMerging"
    stages_attr = "layers"
    grid_attr = "input_resolution"  # a block's attribute holding its stage's (H, W) grid
    merge: dict = {"name": "patch_merge"}

    def square(self, pair_: Any, what: str, where: str) -> int:
        """One side of a square ``(h, w)``, refused otherwise (vitlab's windows are square)."""
        h, w = (int(v) for v in pair_)
        if h != w:
            raise self.unsupported(f"{h}x{w} {what} (vitlab's windows are square) at {where}")
        return h

    def window(self, a: nn.Module, where: str, dim: int) -> tuple[nn.Linear, nn.Linear]:
        """A window attention of ``attn_cls`` at the stage's width: its ``qkv`` and ``proj``."""
        if not self.is_timm(a, self.attn_cls):
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if qkv.out_features != 3 * dim or proj.in_features != dim or proj.out_features != dim:
            raise self.unsupported(f"attention width other than the stage's {dim} at {where}")
        return qkv, proj

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        qkv, proj = self.window(a, where, dim)
        return {"heads": a.num_heads, "proj_drop": a.proj_drop.p, "name": "window",
                "params": {"qkv_bias": qkv.bias is not None, "proj_bias": proj.bias is not None,
                           "attn_drop": fmt_float(a.attn_drop.p),
                           "window_size": self.square(a.window_size, "windows", where), "rel_pos": "table"}}

    def block_kind(self, b: nn.Module, where: str) -> dict:
        return {"name": "prenorm", "params": {"init_values": None}}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        """A Swin block: pre-norm, window attention shifted by ``shift_size`` (0 where the grid
        fits in one window, as vitlab's ``window`` does, unless ``always_partition``)."""
        if not self.is_timm(b, self.block_cls):
            raise self.unsupported(f"block type {type(b).__module__}.{type(b).__name__} at {where}")
        attn, mlp = self.parts(b, where, dim=dim)
        w, shift = attn["params"]["window_size"], tuple(int(s) for s in b.shift_size)
        if effective_shift(tuple(getattr(b, self.grid_attr)), w, shift) != shift:
            raise self.unsupported(f"a shift on a grid that fits in one window (always_partition) at {where}")
        attn["params"]["shift"] = shift[0] if shift[0] == shift[1] else list(shift)
        return BlockRead(attn, mlp, self.block_kind(b, where), drop_path_of(b))

    def transition(self, down: nn.Module, s: int, in_dim: int) -> tuple[int, dict]:
        """Patch merging into stage ``s`` (norm and reduction, in either order): its width out."""
        where = f"{self.stages_attr}.{s}.downsample"
        if not self.is_timm(down, self.merge_cls):
            raise self.unsupported(f"stage transition {type(down).__name__} at {where}")
        red = self.linear(down.reduction, f"{where}.reduction")
        if red.bias is not None or red.in_features != 4 * in_dim:
            raise self.unsupported(f"patch merging reduction with a bias or of another width at {where}")
        self.norm(down.norm, f"{where}.norm")
        return red.out_features, self.merge

    def embed(self) -> tuple[dict, int]:
        """The patch embedding's fields of the spec, and its width."""
        return self.patch_embed(), self.m.patch_embed.proj.out_channels

    def final_norm(self) -> bool:
        final = not self.is_id(self.m.norm)
        if final:
            self.norm(self.m.norm, "norm")
        return final

    def spec(self) -> ViTSpec:
        m, S = self.own_model(), self.stages_attr
        if m.dynamic_img_size:
            raise self.unsupported("dynamic_img_size (strict_img_size=False)")
        embed, width = self.embed()
        data: dict[str, Any] = {"name": self.name, **embed, "class_token": False, "reg_tokens": 0,
                                "pos_embed": {"name": "none"}, "pool": {"name": "avg"}, "pre_norm": False,
                                "transition": self.merge}
        stages, blocks = [], []
        for s, layer in enumerate(getattr(m, S)):
            if not self.is_timm(layer, self.stage_cls):
                raise self.unsupported(f"stage {type(layer).__name__} at {S}.{s}")
            stage: dict[str, Any] = {}
            if s:
                width, stage["transition"] = self.transition(layer.downsample, s, width)
            elif not self.is_id(layer.downsample):
                raise self.unsupported("patch merging before the first stage")
            stages.append({**self.stage(s, layer.blocks, width, f"{S}.{s}.blocks", blocks), **stage})

        first = blocks[0][0]
        fixed = {k: v for k, v in first.attn["params"].items() if k not in PER_STAGE}
        for b, _, where in blocks:
            attn = {k: v for k, v in b.attn["params"].items() if k not in PER_STAGE}
            if (attn, b.settings(attn=("heads", "params"), mlp=("hidden",))[:2]) != (
                    fixed, first.settings(attn=("heads", "params"), mlp=("hidden",))[:2]):
                raise self.unsupported(f"blocks that differ other than in window, shift or width ({where})")
        attn = [{"name": "window", "params": b.attn["params"]} for b, _, _ in blocks]
        data["attention"], layers = self.per_block("attention", attn)
        data["mlp_ratio"], ratio_layers = self.per_block("mlp_ratio", self.mlp_ratios(blocks))
        data["block"], block_layers = self.per_block("block", [b.block for b, _, _ in blocks])
        data.update(stages=stages, layers=layers + ratio_layers + block_layers, final_norm=self.final_norm(),
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]})
        data.update(self.classifier_head(m.head))
        return self.finish_staged(data, blocks)


# --- spec -> timm -----------------------------------------------------------------------------------

def stage_windows(spec: ViTSpec, ex: Exporting, fail, whose: str, fixed: dict, rel_pos: str, cosine: bool,
                  overridable: tuple[str, ...], one_ratio: bool = False) -> tuple[list, list, list, dict]:
    """What timm's Swin classes take per stage: ``(windows, pretrained windows, MLP ratios, the one
    set of attention params)``, refusing what they cannot hold (prefix tokens, components other
    than ``fixed``, attention other than ``window`` with ``rel_pos`` and ``cosine``, per-block
    overrides of ``overridable`` kinds, shifts other than half a window on a stage's odd blocks,
    widths that do not double; with ``one_ratio``, MLP ratios that differ). ``whose`` names the
    timm model in messages."""
    if spec.class_token or spec.reg_tokens or spec.pre_norm or spec.dynamic_img_size or spec.stages is None:
        raise fail(f"prefix tokens, pre_norm, dynamic_img_size or no stages ({whose}: none, none, no, stages)")
    pe = spec.patch_embed
    if (pe.name != "conv" or not pe.params.get("norm") or not pe.params.get("bias", True) or pe.params.get("pad")
            or pe.params.get("stride") not in (None, *spec.patch_hw)):
        raise fail(f"patch embedding '{pe.name}' {pe.params} ({whose}: a conv with bias, then the norm)")
    for kind, (name, want) in fixed.items():
        sel = spec.selection(kind)
        if sel.name != name or any(sel.params.get(k, v) != v for k, v in want.items()):
            raise fail(f"{kind} '{sel.name}' {sel.params} ({whose}: {name} {want})")
    if one_ratio and len({p.mlp_ratio for p in spec.block_plans()}) != 1:
        raise fail(f"MLP ratios that differ between blocks (timm's {whose} takes one)")
    contexts, plans = spec.stage_contexts(ex.registry, device="meta"), spec.block_plans()
    windows, pretrained, ratios, attn = [], [], [], set()
    for stage in spec.stage_plans():
        grid, mine = contexts[stage.index].grid_size, [plans[i] for i in stage.blocks]
        sels = [p.selections["attention"] for p in mine]
        if any(p.selections[k] != spec.selection(k) for p in mine for k in overridable):
            raise fail(f"per-block overrides of {' or '.join(overridable)} (stage {stage.index})")
        if any(s.name != "window" or s.params["rel_pos"] != rel_pos or s.params["cosine"] != cosine for s in sels):
            raise fail(f"attention other than window with rel_pos: {rel_pos}{' and cosine' if cosine else ''} "
                       f"(stage {stage.index})")
        w, pw = sels[0].params["window_size"], sels[0].params["pretrained_window_size"]
        if w > max(grid) or any((s.params["window_size"], s.params["pretrained_window_size"]) != (w, pw) for s in sels):
            raise fail(f"window sizes that differ within stage {stage.index}, or exceed its {grid[0]}x{grid[1]} grid")
        for j, s in enumerate(sels):  # timm shifts the odd blocks of a stage by half a window
            want = effective_shift(grid, w, (w // 2, w // 2) if j % 2 else (0, 0))
            if effective_shift(grid, w, as_pair(s.params["shift"])) != want:
                raise fail(f"shift {s.params['shift']} at block {stage.start + j} ({whose}: 0 on even blocks of a "
                           f"stage, window_size // 2 on odd ones)")
            attn.add(tuple(sorted((k, v) for k, v in s.params.items() if k not in PER_STAGE)))
        if len({p.mlp_ratio for p in mine}) != 1:
            raise fail(f"MLP ratios that differ within stage {stage.index}")
        windows.append(w)
        pretrained.append(pw)
        ratios.append(mine[0].mlp_ratio)
    if len(attn) != 1:
        raise fail("attention params (biases, dropout, bias MLP) that differ between blocks")
    widths = [st.embed_dim for st in spec.stages]
    if widths != [widths[0] * 2**i for i in range(len(widths))]:  # timm's num_features takes one int
        raise fail(f"stage widths {widths} ({whose} doubles the width at every stage)")
    ap = dict(attn.pop())
    if ap.get("kv_heads") is not None or ap["qk_norm"] or not ap["proj_bias"]:
        raise fail("attention with kv_heads, qk_norm or without output bias")
    return windows, pretrained, ratios, ap


def swin_args(spec: ViTSpec, fail, patch_size, windows: tuple, mlp_ratio) -> dict[str, Any]:
    """The arguments every Swin class takes alike (sizes, stages, windows, rates, the norm)."""
    return dict(img_size=pair(spec.img_size), patch_size=patch_size, in_chans=spec.in_chans,
                num_classes=spec.num_classes, global_pool="avg", embed_dim=spec.stages[0].embed_dim,
                depths=tuple(st.depth for st in spec.stages), num_heads=tuple(st.num_heads for st in spec.stages),
                window_size=windows, mlp_ratio=mlp_ratio, drop_rate=spec.drop_rate,
                proj_drop_rate=spec.proj_drop_rate, drop_path_rate=spec.drop_path_rate,
                norm_layer=norm_layer(spec, fail))


def _claims(spec: ViTSpec) -> bool:
    return spec.stages is not None and all(p.transition.name == "patch_merge" for p in spec.stage_plans()[1:])


def swin_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``SwinTransformer`` (any ``swin_*`` v1 name) for a staged spec."""
    fail = refuser(spec, "SwinTransformer")
    if not spec.final_norm:
        raise fail("no final norm (Swin norms every token before pooling)")
    windows, _, ratios, ap = stage_windows(spec, ex, fail, "Swin", _FIXED, "table", False, ("mlp", "norm", "block"))
    return dict(swin_args(spec, fail, pair(spec.patch_size), tuple(windows), tuple(ratios)),
                qkv_bias=ap["qkv_bias"], attn_drop_rate=ap.get("attn_drop", 0.0))


FAMILY = TimmFamily(
    "swin_transformer", classes=("timm.models.swin_transformer.SwinTransformer",), reader=SwinReader,
    claims=_claims, timm_class="timm.models.swin_transformer.SwinTransformer", kwargs=swin_kwargs,
    state_dict=staged_state_dict(SWIN, swin_kwargs), tables=(SWIN,),
)
