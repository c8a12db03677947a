"""timm's ``CoaT`` (Xu et al. 2021; ``coat``) <-> a staged vitlab spec: the CoaT-Lite models.

CoaT-Lite is a vitlab model with four ``stages``: an ``overlap`` patch embedding that does not
overlap (a 4x4 convolution of stride 4, then a LayerNorm of its own), a class token, the
``coat_conv`` position encoding (its depthwise convolutions, shared by the stage's blocks), and a
``coat_embed`` transition into every later stage (the class token dropped, a 2x2 convolution of
stride 2 and a LayerNorm, the stage's own class token and position encoding). Blocks are
``coat_serial`` (the stage's convolution, then a pre-norm block) of ``factor`` attention. The
final norm and the last stage's class token (or the mean of its patches) feed the classifier.

The non-lite models (``coat_tiny``, ``coat_mini``, ``coat_small``) are refused: their parallel
blocks run after the serial stages on all of the stages' token maps at once (each stage's attention
output adds the others', bilinearly resized to its grid), which a model whose stages run one after
another, each block on one stage's tokens, cannot hold.

The state-dict differences are the ``COAT`` table: timm numbers stages from 1 (``serial_blocks{s}``,
``patch_embed{s}``, ``cls_token{s}``, ``cpe{s}``, ``crpe{s}``: read as stage s - 1), and keeps each
stage's shared convolutions also under every block (``serial_blocks{s}.{j}.cpe``,
``...factoratt_crpe.crpe``): dropped on load, written back on export.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Container, Sequence

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import norm_layer, refuser, require
from ..family import Exporting, TimmFamily
from ..reader import BlockRead, fmt_float
from ..staged import StagedReader, conv_geometry, own_norm, stage_values

_NUMBERED = re.compile(r"(cls_token|patch_embed|cpe|crpe|serial_blocks)([1-9])(?=\.|$)")
_DOTTED = re.compile(r"(cls_token|patch_embed|cpe|crpe|serial_blocks)\.(\d+)(?=\.|$)")
# a block's alias of its stage's shared convolutions, in vitlab's names after the table
_ALIAS = re.compile(r"blocks\.\d+\.(cpe|attn\.crpe)\.")


@dataclass(frozen=True)
class CoatFamily(Family):
    """A table over timm's 1-based stage numbers (``serial_blocks1`` is stage 0), its blocks'
    aliases of the shared convolutions dropped on load."""

    def to_vitlab(self, key: str, depths: Sequence[int] | None = None) -> str:
        return super().to_vitlab(_NUMBERED.sub(lambda m: f"{m[1]}.{int(m[2]) - 1}", key), depths)

    def to_timm(self, key: str, into: Container[str] | None = None, depths: Sequence[int] | None = None) -> str:
        return _DOTTED.sub(lambda m: f"{m[1]}{int(m[2]) + 1}", super().to_timm(key, into, depths))

    def adapt(self, src, depths: Sequence[int] | None = None):
        out = super().adapt(src, depths)
        keys = [k for k in out.keys() if not _ALIAS.match(k)]  # timm's own state dict repeats them per block
        return out.replaced({k: out.shape(k) for k in keys}, out.get)


COAT = CoatFamily(
    "coat", marker=r"serial_blocks\d\.\d+\.factoratt_crpe\.",
    renames=(("cls_token.0", "cls_token"), ("patch_embed.0.{rest}", "patch_embed.{rest}"),
             ("crpe.0.conv_list.{rest}", "pos_embed.conv_list.{rest}"), ("cpe.0.{rest}", "pos_embed.{rest}"),
             ("cls_token.{stage}", "transitions.{stage}.cls_token"),
             ("crpe.{stage}.conv_list.{rest}", "transitions.{stage}.pos_embed.conv_list.{rest}"),
             ("cpe.{stage}.{rest}", "transitions.{stage}.pos_embed.{rest}"),
             ("patch_embed.{stage}.{rest}", "transitions.{stage}.{rest}"),
             ("serial_blocks.{stage}.{j}.factoratt_crpe.{rest}", "blocks.{block}.attn.{rest}"),
             ("serial_blocks.{stage}.{j}.{rest}", "blocks.{block}.{rest}"),
             ("norm4.{rest}", "norm.{rest}")),
)

# what every CoaT-Lite block and the model around them are apart from widths: kind -> (component, params)
_FIXED: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {"act": "gelu", "bias": True, "norm": False}),
    "block": ("coat_serial", {"init_values": None}),
    "patch_embed": ("overlap", {"padding": 0, "eps": 1e-5}),
}


# --- timm -> spec ------------------------------------------------------------------------------------

class CoatReader(StagedReader):
    """Reads a timm ``CoaT`` instance (its modules and shapes, never its name)."""

    timm_module, model_cls = "timm.models.coat", "CoaT"

    def positions(self, s: int, heads: int) -> dict:
        """Stage ``s``'s ``cpe`` and ``crpe`` as ``coat_conv`` params."""
        cpe, crpe = getattr(self.m, f"cpe{s + 1}"), getattr(self.m, f"crpe{s + 1}")
        if not self.is_timm(cpe, "ConvPosEnc") or not self.is_timm(crpe, "ConvRelPosEnc"):
            raise self.unsupported(f"position encodings {type(cpe).__name__}, {type(crpe).__name__} of stage {s}")
        convs = [(cpe.proj, f"cpe{s + 1}.proj")] + [(c, f"crpe{s + 1}.conv_list.{i}") for i, c in enumerate(crpe.conv_list)]
        for c, where in convs:
            k = c.kernel_size[0]
            if (type(c) is not nn.Conv2d or c.groups != c.in_channels or c.out_channels != c.in_channels or c.bias is None
                    or tuple(c.kernel_size) != (k, k) or tuple(c.padding) != (k // 2,) * 2 or k % 2 == 0
                    or tuple(c.stride) != (1, 1) or tuple(c.dilation) != (1, 1)):
                raise self.unsupported(f"convolution other than a same-size depthwise one at {where}")
        if sum(crpe.head_splits) != heads:
            raise self.unsupported(f"relative position heads {crpe.head_splits} for {heads} heads in stage {s}")
        return {"kernel_size": cpe.proj.kernel_size[0], "windows": [c.kernel_size[0] for c in crpe.conv_list],
                "head_splits": list(crpe.head_splits)}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        s = int(where[len("serial_blocks")]) - 1
        if not self.is_timm(b, "SerialBlock"):
            raise self.unsupported(f"block type {type(b).__name__} at {where}")
        a = b.factoratt_crpe
        if b.cpe is not getattr(self.m, f"cpe{s + 1}") or a.crpe is not getattr(self.m, f"crpe{s + 1}"):
            raise self.unsupported(f"position encodings not the stage's shared ones at {where}")
        if not self.is_timm(a, "FactorAttnConvRelPosEnc"):
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}.factoratt_crpe")
        qkv, proj = self.linear(a.qkv, f"{where}.factoratt_crpe.qkv"), self.linear(a.proj, f"{where}.factoratt_crpe.proj")
        if qkv.out_features != 3 * dim or proj.out_features != dim or dim % a.num_heads or proj.bias is None:
            raise self.unsupported(f"attention width other than the stage's {dim}, or without output bias, at {where}")
        self.norm(b.norm1, f"{where}.norm1")
        self.norm(b.norm2, f"{where}.norm2")
        if getattr(b.drop_path, "drop_prob", 0.0):
            raise self.unsupported(f"stochastic depth at {where} (CoaT's rate is the same in every block, vitlab's "
                                   "grows with depth)")
        attn = {"name": "factor", "params": {"qkv_bias": qkv.bias is not None}, "heads": a.num_heads,
                "proj_drop": a.proj_drop.p}
        return BlockRead(attn, self.mlp(b.mlp, f"{where}.mlp", dim), {"name": "coat_serial"})

    def embed(self, s: int, in_chans: int) -> tuple[int, dict]:
        """``patch_embed{s + 1}``: its width and its convolution's geometry and norm eps."""
        from timm.layers import PatchEmbed

        pe, where = getattr(self.m, f"patch_embed{s + 1}"), f"patch_embed{s + 1}"
        if type(pe) is not PatchEmbed or pe.proj.in_channels != in_chans:
            raise self.unsupported(f"patch embedding {type(pe).__name__} at {where}")
        k, stride, p = conv_geometry(self, pe.proj, f"{where}.proj")
        if k != stride or p:
            raise self.unsupported(f"patch embedding with kernel {k}, stride {stride}, padding {p} at {where}")
        return pe.proj.out_channels, {"k": k, "eps": own_norm(self, pe.norm, f"{where}.norm")}

    def spec(self) -> ViTSpec:
        m = self.own_model()
        if m.parallel_blocks is not None:
            raise self.unsupported("parallel blocks (CoaT's co-scale blocks mix all four stages' tokens at once; "
                                   "vitlab's stages run one after another)")
        if m.return_interm_layers or m.norm4 is None:
            raise self.unsupported("return_interm_layers (feature maps out, no final norm or head)")
        width, pe = self.embed(0, m.in_chans)
        h, w = m.patch_embed1.img_size
        data: dict[str, Any] = {
            "name": self.name, "img_size": int(h) if h == w else [int(h), int(w)], "patch_size": pe["k"],
            "in_chans": m.in_chans, "patch_embed": {"name": "overlap", "params": {"padding": 0, "eps": pe["eps"]}},
            "class_token": True, "reg_tokens": 0, "pre_norm": False, "final_norm": True,
            "pool": {"name": "token" if m.global_pool == "token" else "avg"},
        }
        stages, blocks, positions = [], [], []
        for s in range(4):
            stage: dict[str, Any] = {}
            if s:
                width, t = self.embed(s, width)
                stage["transition"] = {"name": "coat_embed", "params": {"kernel_size": t["k"], "stride": t["k"],
                                                                         "eps": t["eps"]}}
            stages.append({**self.stage(s, getattr(m, f"serial_blocks{s + 1}"), width, f"serial_blocks{s + 1}",
                                        blocks), **stage})
            positions.append(self.positions(s, stages[-1]["num_heads"]))
        if any(p != positions[0] for p in positions):
            raise self.unsupported("position encodings whose kernels differ between stages")
        self.norm(m.norm4, "norm4")
        first = self.alike(blocks, "heads or width")
        data["mlp_ratio"], layers = self.per_block("mlp_ratio", self.mlp_ratios(blocks))
        data.update(stages=stages, layers=layers, block=first.block, transition=stages[1]["transition"],
                    pos_embed={"name": "coat_conv", "params": positions[0]},
                    attention={"name": "factor", "params": first.attn["params"]},
                    mlp={"name": "mlp", "params": first.mlp["params"]}, **self.linear_head())
        return self.finish_staged(data, blocks)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return spec.stages is not None and all(p.transition.name == "coat_embed" for p in spec.stage_plans()[1:])


def coat_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``CoaT`` (CoaT-Lite: no parallel blocks) for a staged spec."""
    fail = refuser(spec, "CoaT")
    stages = spec.stage_plans()
    if (len(stages) != 4 or not spec.class_token or spec.reg_tokens or spec.pre_norm or not spec.final_norm
            or spec.dynamic_img_size or spec.drop_path_rate or spec.pos_drop_rate):
        raise fail("other than four stages, a class token, a final norm, a fixed image size and no stochastic depth")
    if spec.patch_hw[0] != spec.patch_hw[1] or spec.pool.name not in ("token", "avg") or spec.pool.params.get("norm"):
        raise fail("non-square patches, or a pool other than token or avg without norm")
    require(spec, ex.registry, fail, _FIXED, {"patch_embed": ("stride",)}, "CoaT")
    if spec.patch_embed.params.get("stride") not in (None, spec.patch_hw[0]):
        raise fail("an overlapping patch embedding (CoaT: stride = patch size)")
    pos = spec.pos_embed
    if pos.name != "coat_conv" or pos.params.get("kernel_size", 3) != 3:
        raise fail(f"pos_embed '{pos.name}' {pos.params} (CoaT: coat_conv with kernel_size 3)")
    for st in stages[1:]:
        t = st.transition.params
        if (t.get("kernel_size", 2), t.get("stride", 2), t.get("padding", 0), t.get("eps", 1e-5), t.get("in_norm", False)) != (2, 2, 0, 1e-5, False):
            raise fail(f"transition {t} into stage {st.index} (CoaT: coat_embed 2x2, stride 2)")
    if len({st.num_heads for st in stages}) != 1:
        raise fail("heads that differ between stages (CoaT: one num_heads)")
    plans = spec.block_plans()
    attn = {repr(p.selections["attention"]) for p in plans}
    sel = plans[0].selections["attention"].params
    if len(attn) != 1 or plans[0].selections["attention"].name != "factor" or sel.get("qk_norm") or not sel.get(
            "proj_bias", True) or sel.get("qkv_bias", True) == "qv" or sel.get("kv_heads") is not None:
        raise fail("attention other than factor with an output bias, the same in every block")
    if any(p.selections[k] != spec.selection(k) for p in plans for k in ("mlp", "norm", "block")):
        raise fail("per-block overrides other than the MLP ratio")
    heads = stages[0].num_heads
    windows = pos.params.get("windows", [3])
    splits = pos.params.get("head_splits") or [heads]
    if len(set(windows)) != len(windows):
        raise fail("a window repeated (timm's crpe_window is a dict of windows)")
    h, w = spec.img_hw
    return dict(
        img_size=h if h == w else (h, w), patch_size=spec.patch_hw[0], in_chans=spec.in_chans,
        num_classes=spec.num_classes, embed_dims=tuple(st.embed_dim for st in stages),
        serial_depths=tuple(st.depth for st in stages), parallel_depth=0, num_heads=heads,
        mlp_ratios=tuple(stage_values(spec, fail, "MLP ratio", lambda p: p.mlp_ratio)),
        qkv_bias=sel.get("qkv_bias", True), drop_rate=spec.drop_rate, proj_drop_rate=spec.proj_drop_rate,
        norm_layer=norm_layer(spec, fail), crpe_window=dict(zip(windows, splits)), global_pool=spec.pool.name,
    )


def coat_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A vitlab CoaT-Lite's weights in timm's names, with every block's alias of its stage's
    shared convolutions."""
    coat_kwargs(model.spec, ex)
    depths = [st.depth for st in model.spec.stages]
    sd = COAT.restore({k: v.detach() for k, v in model.state_dict().items()}, depths=depths)
    for s, depth in enumerate(depths, start=1):
        shared = [(k, f"cpe.{k[len(f'cpe{s}.'):]}") for k in sd if k.startswith(f"cpe{s}.")]
        shared += [(k, f"factoratt_crpe.crpe.{k[len(f'crpe{s}.'):]}") for k in sd if k.startswith(f"crpe{s}.")]
        for j in range(depth):
            sd.update({f"serial_blocks{s}.{j}.{alias}": sd[k] for k, alias in shared})
    return sd


FAMILY = TimmFamily(
    "coat", classes=("timm.models.coat.CoaT",), reader=CoatReader, claims=_claims,
    timm_class="timm.models.coat.CoaT", kwargs=coat_kwargs, state_dict=coat_state_dict,
    tables=(COAT,),
)
