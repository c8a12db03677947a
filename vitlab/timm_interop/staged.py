"""What the readers and exports of timm's hierarchical families share: a ``StagedReader`` that
matches a family's timm classes by name in one module, reads a stage's blocks and finishes a spec
of ``stages``; the leaf layers several of them build alike (a dense convolution's geometry, a
component's own LayerNorm, timm's ``ClassifierHead``); and a state dict written back through a
family's table with the stages' depths.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn

from ..layout import format_indices
from ..spec import ViTSpec
from .bridge import Family
from .reader import BlockRead, Reader, common_and_layers, fmt_float


def at_text(indices: list[int]) -> str:
    """Block indices as ``at``: one stepped range when they are one (``"1-9:2"``), else ranges."""
    steps = {b - a for a, b in zip(indices, indices[1:])}
    if len(indices) > 2 and len(steps) == 1 and (step := steps.pop()) > 1:
        return f"{indices[0]}-{indices[-1]}:{step}"
    return format_indices(indices)


def drop_path_of(b: nn.Module) -> float:
    """A timm block's stochastic-depth rate (0 where its ``drop_path1`` is an identity)."""
    return float(getattr(b.drop_path1, "drop_prob", 0.0))


def own_norm(reader: Reader, mod: nn.Module, where: str) -> float:
    """The eps of a component's own LayerNorm (timm's ``nn.LayerNorm`` with weight and bias)."""
    if type(mod) is not nn.LayerNorm or not mod.elementwise_affine or mod.bias is None:
        raise reader.unsupported(f"norm {type(mod).__name__} other than nn.LayerNorm with weight and bias at {where}")
    return fmt_float(mod.eps)


def conv_geometry(reader: Reader, conv: nn.Module, where: str) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a square, dense, biased ``nn.Conv2d``."""
    if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.bias is None or conv.padding_mode != "zeros":
        raise reader.unsupported(f"convolution other than a dense nn.Conv2d with bias at {where}")
    (k, k2), (s, s2), (p, p2) = conv.kernel_size, conv.stride, conv.padding
    if k != k2 or s != s2 or p != p2 or tuple(conv.dilation) != (1, 1):
        raise reader.unsupported(f"non-square or dilated convolution at {where}")
    return k, s, p


class StagedReader(Reader):
    """A reader of a timm model built as stages of blocks of one width each. A subclass names its
    timm module (``timm_module``) and model class (``model_cls``); its ``spec`` walks the stages,
    reading each stage's blocks with ``stage`` into ``(block read, width, where)`` triples."""

    timm_module: str = ""
    model_cls: str = ""

    def is_timm(self, obj: Any, cls: str) -> bool:
        """Whether ``obj`` is exactly the class ``cls`` of the family's timm module."""
        return type(obj) is getattr(importlib.import_module(self.timm_module), cls)

    def own_model(self) -> nn.Module:
        """The model, refused unless exactly ``model_cls`` (a subclass may change what is read)."""
        if not self.is_timm(self.m, self.model_cls):
            raise self.unsupported(f"{self.model_cls} subclass {type(self.m).__name__}")
        return self.m

    def stage(self, s: int, mods: nn.Module, width: int, prefix: str, blocks: list) -> dict[str, Any]:
        """Stage ``s``'s blocks (``mods``, named ``{prefix}.{j}``) read at ``width`` onto ``blocks``;
        the stage's entry of ``stages`` (its depth, width and heads)."""
        if not len(mods):
            raise self.unsupported(f"stage {s} without blocks")
        read = [self.block(b, len(blocks) + j, width, f"{prefix}.{j}") for j, b in enumerate(mods)]
        blocks += [(b, width, f"{prefix}.{j}") for j, b in enumerate(read)]
        return {"depth": len(read), "embed_dim": width, "num_heads": read[0].attn["heads"]}

    def alike(self, blocks: list, differ: str, attn: tuple[str, ...] = ("heads", "params")) -> BlockRead:
        """The first block, refusing blocks that differ but in ``attn`` entries and MLP widths."""
        first = blocks[0][0]
        for b, _, where in blocks:
            if b.settings(attn=attn, mlp=("hidden",)) != first.settings(attn=attn, mlp=("hidden",)):
                raise self.unsupported(f"blocks that differ other than in {differ} ({where})")
        return first

    def mlp_ratios(self, blocks: list) -> list[float]:
        """Each block's MLP ratio, read off its hidden width at its stage's width."""
        return [self.mlp_ratio(b.mlp["hidden"], f"{where}.mlp", w) for b, w, where in blocks]

    @staticmethod
    def per_block(key: str, values: list) -> tuple[Any, list[dict]]:
        """``key``'s recipe value and ``layers`` for the blocks that differ (``common_and_layers``,
        blocks written as stepped ranges)."""
        return common_and_layers(values, key, at_text)

    def classifier_head(self, head: nn.Module) -> dict[str, Any]:
        """timm's ``ClassifierHead`` (an average pool, dropout, a linear classifier with bias)."""
        from timm.layers import ClassifierHead

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

    def linear_head(self) -> dict[str, Any]:
        """A ``head`` Linear (or none) after ``head_drop``: its classes and dropout."""
        m = self.m
        return {"num_classes": 0 if self.is_id(m.head) else self.linear(m.head, "head").out_features,
                "drop_rate": fmt_float(m.head_drop.p)}

    def finish_staged(self, data: dict[str, Any], blocks: list) -> ViTSpec:
        """The one norm and the blocks' rates into ``data``, validated."""
        data.update(norm=self.norm_selection(), proj_drop_rate=fmt_float(blocks[0][0].attn["proj_drop"]),
                    drop_path_rate=fmt_float(blocks[-1][0].drop_path) if len(blocks) > 1 else 0.0)
        return self.validated(data)


# --- spec -> timm -----------------------------------------------------------------------------------

def stage_values(spec: ViTSpec, fail, kind: str, key) -> list:
    """One value of ``key(block plan)`` per stage, refused where it differs inside a stage."""
    plans, out = spec.block_plans(), []
    for stage in spec.stage_plans():
        values = {repr(key(plans[i])) for i in stage.blocks}
        if len(values) != 1:
            raise fail(f"{kind} that differs within stage {stage.index}")
        out.append(key(plans[stage.start]))
    return out


def staged_state_dict(table: Family, kwargs: Callable, prepare: Callable[[dict], dict] = lambda sd: sd) -> Callable:
    """``(model, exporting) -> `` a staged model's weights in timm's names: ``kwargs`` first refuses
    what the timm class cannot hold, then ``table`` is read backwards with the stages' depths
    (``prepare`` first reshapes vitlab's own tensors)."""
    def state_dict(model, ex) -> dict[str, torch.Tensor]:
        kwargs(model.spec, ex)
        sd = prepare({k: v.detach() for k, v in model.state_dict().items()})
        return table.restore(sd, depths=[st.depth for st in model.spec.stages])
    return state_dict
