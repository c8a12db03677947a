"""timm's ``Levit`` and ``LevitDistilled`` (LeViT, Graham et al. 2021; ``levit``) <-> a staged vitlab spec.

LeViT is a vitlab model with ``stages`` and no LayerNorm: a ``levit_stem`` patch embedding (conv +
BatchNorm per halving, 16 or 8 px), no position embedding and no prefix tokens, ``residual``
blocks of ``levit`` attention (BN-linear projections, a learned bias per head and offset) and
``bn_mlp``, ``levit_subsample`` transitions into every stage after the first, and the ``avg_bn``
pool (mean, then BatchNorm and Linear; ``distilled``: timm's ``head_dist`` averaged in). timm's
``levit_conv_*`` are the same function with 1x1 convolutions: every BN-linear's ``conv: true``.
The state-dict differences are the ``LEVIT`` table: timm keeps blocks and transitions per stage
(``stages.{stage}.blocks.{j}``, ``stages.{stage}.downsample``), the stem as ``stem`` and the
distillation classifier as ``head_dist``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import refuser
from ..family import Exporting, TimmFamily
from ..reader import Reader, common_and_layers

LEVIT = Family(
    "levit", marker=r"stem\.conv1\.linear\.",
    renames=(("stem.{rest}", "patch_embed.{rest}"),
             ("stages.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
             ("stages.{stage}.downsample.{rest}", "transitions.{stage}.{rest}"),
             ("head_dist.{rest}", "head.dist.{rest}")),
)

_ACT_ARG = {"hardswish": "hard_swish", "silu": "silu", "gelu": "gelu", "relu": "relu"}  # timm's act_layer names
_STEMS = {16: "s16", 8: "s8"}  # patch size -> timm's stem_type


# --- timm -> spec ------------------------------------------------------------------------------------

class LevitReader(Reader):
    """Reads a timm ``Levit`` / ``LevitDistilled`` instance (its modules and shapes, never its name)."""

    def act(self, mod: nn.Module, where: str) -> str:
        if type(mod) is nn.Hardswish:
            return "hardswish"
        return super().act(mod, where)

    def bn_linear(self, mod: nn.Module, where: str, conv: bool) -> tuple[int, int]:
        """A ``LinearNorm`` (``ConvNorm`` 1x1 with ``conv``): its (in, out) widths."""
        from timm.models.levit import ConvNorm, LinearNorm

        lin, bn = getattr(mod, "linear", None), getattr(mod, "bn", None)
        if type(mod) is not (ConvNorm if conv else LinearNorm) or lin.bias is not None:
            raise self.unsupported(f"{type(mod).__name__} at {where} (a {'1x1 ConvNorm' if conv else 'LinearNorm'})")
        if conv and (tuple(lin.kernel_size) != (1, 1) or tuple(lin.stride) != (1, 1) or tuple(lin.padding) != (0, 0)
                     or lin.groups != 1):
            raise self.unsupported(f"convolution other than 1x1 at {where}")
        self.batch_norm(bn, f"{where}.bn")
        return (lin.in_channels, lin.out_channels) if conv else (lin.in_features, lin.out_features)

    def batch_norm(self, bn: nn.Module, where: str) -> None:
        if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine or not bn.track_running_stats
                or bn.eps != 1e-5):
            raise self.unsupported(f"BatchNorm other than affine with running stats and eps 1e-5 at {where}")

    def projection(self, seq: nn.Module, where: str, conv: bool, dims: tuple[int, int]) -> str:
        """timm's ``proj``: the activation, then a BN-linear ``dims`` wide; returns the activation."""
        if self.bn_linear(seq.ln, f"{where}.ln", conv) != dims:
            raise self.unsupported(f"attention output projection of another width at {where}")
        return self.act(seq.act, f"{where}.act")

    def attention(self, a: nn.Module, where: str, dim: int, conv: bool, grid: tuple) -> dict:
        from timm.models.levit import Attention

        if type(a) is not Attention or a.use_conv != conv:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        h, kd, vd = a.num_heads, a.key_dim, a.val_dim
        if self.bn_linear(a.qkv, f"{where}.qkv", conv) != (dim, h * (2 * kd + vd)) or tuple(a.resolution) != grid:
            raise self.unsupported(f"attention of another width or grid at {where}")
        act = self.projection(a.proj, f"{where}.proj", conv, (h * vd, dim))
        return {"heads": h, "params": {"key_dim": kd, "attn_ratio": vd / kd, "act": act, "conv": conv}}

    def mlp(self, mlp: nn.Module, where: str, dim: int, conv: bool) -> tuple[dict, int]:
        from timm.models.levit import LevitMlp

        if type(mlp) is not LevitMlp:
            raise self.unsupported(f"MLP layer {type(mlp).__name__} at {where}")
        d_in, hidden = self.bn_linear(mlp.ln1, f"{where}.ln1", conv)
        if d_in != dim or self.bn_linear(mlp.ln2, f"{where}.ln2", conv) != (hidden, dim) or mlp.drop.p:
            raise self.unsupported(f"MLP of another width, or with dropout, at {where}")
        return {"act": self.act(mlp.act, f"{where}.act"), "conv": conv}, hidden

    def no_drop_path(self, mod: nn.Module, where: str) -> None:
        if not self.is_id(mod):  # timm's rate is the same in every block; vitlab's grows with depth
            raise self.unsupported(f"stochastic depth (drop_path_rate; timm's is constant over blocks) at {where}")

    def transition(self, ds: nn.Module, where: str, in_dim: int, out_dim: int, conv: bool, grid: tuple) -> dict:
        from timm.models.levit import AttentionDownsample, Downsample, LevitDownsample

        a = getattr(ds, "attn_downsample", None)
        if type(ds) is not LevitDownsample or type(a) is not AttentionDownsample or a.use_conv != conv:
            raise self.unsupported(f"stage transition {type(ds).__name__} at {where}")
        down = a.q.down
        pooled = (down.pool is not None) if type(down) is Downsample else down.kernel_size not in (1, (1, 1))
        if pooled or tuple(a.resolution) != grid:
            raise self.unsupported(f"subsampling by average pooling (down_op with use_pool) or another grid at {where}")
        h, kd, vd, s = a.num_heads, a.key_dim, a.val_dim, a.stride
        if (self.bn_linear(a.kv, f"{where}.kv", conv) != (in_dim, h * (kd + vd))
                or self.bn_linear(a.q.ln, f"{where}.q.ln", conv) != (in_dim, h * kd)):
            raise self.unsupported(f"subsampling attention of another width at {where}")
        attn_act = self.projection(a.proj, f"{where}.proj", conv, (h * vd, out_dim))
        mlp, hidden = self.mlp(ds.mlp, f"{where}.mlp", out_dim, conv)
        self.no_drop_path(ds.drop_path, f"{where}.drop_path")
        return {"name": "levit_subsample", "params": {
            "key_dim": kd, "num_heads": None if h == in_dim // kd else h, "attn_ratio": vd / kd,
            "mlp_ratio": self.mlp_ratio(hidden, f"{where}.mlp", out_dim), "stride": s, "act": mlp["act"],
            "attn_act": None if attn_act == mlp["act"] else attn_act, "conv": conv}}

    def stem(self) -> tuple[int, dict]:
        """The stem's stride (the patch size) and the ``levit_stem`` selection."""
        from timm.models.levit import Stem8, Stem16

        stem = self.m.stem
        if type(stem) not in (Stem8, Stem16):
            raise self.unsupported(f"stem {type(stem).__name__} (a stem_backbone)")
        convs = [m for n, m in stem.named_children() if n.startswith("conv")]
        acts = {self.act(m, f"stem.{n}") for n, m in stem.named_children() if n.startswith("act")}
        D = self.m.embed_dim[0]
        widths = [convs[0].linear.in_channels] + [D // 2 ** (len(convs) - 1 - i) for i in range(len(convs))]
        for i, c in enumerate(convs):
            lin = c.linear
            if ((lin.in_channels, lin.out_channels) != (widths[i], widths[i + 1]) or tuple(lin.kernel_size) != (3, 3)
                    or tuple(lin.stride) != (2, 2) or tuple(lin.padding) != (1, 1) or lin.bias is not None):
                raise self.unsupported(f"stem convolution other than LeViT's at stem.conv{i + 1}")
            self.batch_norm(c.bn, f"stem.conv{i + 1}.bn")
        if len(acts) != 1:
            raise self.unsupported(f"stem activations that differ ({sorted(acts)})")
        return stem.stride, {"name": "levit_stem", "params": {"act": acts.pop()}}

    def spec(self) -> ViTSpec:
        from timm.models.levit import Levit, LevitBlock, LevitDistilled, LevitStage, NormLinear

        m = self.m
        if type(m) not in (Levit, LevitDistilled):
            raise self.unsupported(f"Levit subclass {type(m).__name__}")
        if m.global_pool != "avg":
            raise self.unsupported(f"global_pool '{m.global_pool}' (LeViT's head needs the average)")
        stride, stem = self.stem()
        conv = bool(m.use_conv)
        first = m.stages[0].blocks[0].attn if len(m.stages) and len(m.stages[0].blocks) else None
        if first is None:
            raise self.unsupported("a first stage without blocks")
        grid = tuple(first.resolution)
        data: dict[str, Any] = {
            "name": self.name, "img_size": grid[0] * stride if grid[0] == grid[1] else [g * stride for g in grid],
            "patch_size": stride, "in_chans": m.in_chans, "class_token": False, "reg_tokens": 0,
            "patch_embed": stem, "pos_embed": {"name": "none"}, "pre_norm": False, "final_norm": False,
            "block": {"name": "residual"}, "pool": {"name": "avg_bn", "params": {"distilled": type(m) is LevitDistilled}}}
        stages, attns, mlps, ratios, transitions, width = [], [], [], [], [], None
        for s, stage in enumerate(m.stages):
            where = f"stages.{s}"
            if type(stage) is not LevitStage or not len(stage.blocks):
                raise self.unsupported(f"stage {type(stage).__name__} without blocks at {where}")
            dim = m.embed_dim[s]
            entry: dict[str, Any] = {}
            if s == 0:
                if not self.is_id(stage.downsample):
                    raise self.unsupported("a transition before the first stage")
            else:
                entry["transition"] = self.transition(stage.downsample, f"{where}.downsample", width, dim, conv, grid)
                transitions.append(entry["transition"])
                grid = tuple((g - 1) // entry["transition"]["params"]["stride"] + 1 for g in grid)
            heads = None
            for j, b in enumerate(stage.blocks):
                bw = f"{where}.blocks.{j}"
                if type(b) is not LevitBlock:
                    raise self.unsupported(f"block type {type(b).__name__} at {bw}")
                attn = self.attention(b.attn, f"{bw}.attn", dim, conv, grid)
                mlp, hidden = self.mlp(b.mlp, f"{bw}.mlp", dim, conv)
                self.no_drop_path(b.drop_path1, f"{bw}.drop_path1")
                heads = heads or attn["heads"]
                if attn["heads"] != heads:
                    raise self.unsupported(f"heads that differ within a stage at {bw}")
                attns.append({"name": "levit", "params": attn["params"]})
                mlps.append({"name": "bn_mlp", "params": mlp})
                ratios.append(self.mlp_ratio(hidden, f"{bw}.mlp", dim))
            stages.append({"depth": len(stage.blocks), "embed_dim": dim, "num_heads": heads, **entry})
            width = dim
        if len({repr(t) for t in transitions}) <= 1:  # one transition for every stage: the recipe's
            for st in stages:
                st.pop("transition", None)
        data["transition"] = transitions[0] if transitions else {"name": "levit_subsample"}
        data["attention"], layers = common_and_layers(attns, "attention")
        data["mlp"], mlp_layers = common_and_layers(mlps, "mlp")
        data["mlp_ratio"], ratio_layers = common_and_layers(ratios, "mlp_ratio")
        data.update(stages=stages, layers=layers + mlp_layers + ratio_layers, num_classes=0, drop_rate=0.0)
        for head in (m.head, getattr(m, "head_dist", None)):
            if self.is_id(head):
                continue
            if type(head) is not NormLinear or head.linear.bias is None or head.drop.p:
                raise self.unsupported("classifier other than BatchNorm then Linear with bias, without dropout")
            self.batch_norm(head.bn, "head.bn")
            data["num_classes"] = head.linear.out_features
        return self.validated(data)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return spec.patch_embed.name == "levit_stem" or spec.attention.name == "levit"


def levit_class(spec: ViTSpec, ex: Exporting) -> type:
    from timm.models.levit import Levit, LevitDistilled

    return LevitDistilled if spec.pool.params.get("distilled") else Levit


def levit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Levit`` (any ``levit_*`` / ``levit_conv_*``) for a spec."""
    fail = refuser(spec, "Levit")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or spec.final_norm or spec.dynamic_img_size:
        raise fail("prefix tokens, pre_norm, a final norm or dynamic_img_size (LeViT: none of them)")
    if spec.drop_rate or spec.drop_path_rate or spec.proj_drop_rate:
        raise fail("dropout or stochastic depth (timm's LeViT drops between its head's BatchNorm and Linear, at a "
                   "constant rate over blocks, and nowhere in its MLPs)")
    ph, pw = spec.patch_hw
    if spec.patch_embed.name != "levit_stem" or ph != pw or ph not in _STEMS or any(s % ph for s in spec.img_hw):
        raise fail(f"patch embedding '{spec.patch_embed.name}' of {ph}x{pw} on {spec.img_hw} (LeViT: levit_stem of "
                   "16 or 8 px dividing the image)")
    for kind, name in (("pos_embed", "none"), ("block", "residual"), ("pool", "avg_bn")):
        if spec.selection(kind).name != name:
            raise fail(f"{kind} '{spec.selection(kind).name}' (LeViT: {name})")
    plans, stages = spec.block_plans(), spec.stage_plans()
    attn, mlp, ratios, key_dims = [], [], [], set()
    for st in stages:
        sels = {repr(plans[i].selections["attention"]) for i in st.blocks}
        mine = [plans[i] for i in st.blocks]
        if len(sels) != 1 or len({p.mlp_ratio for p in mine}) != 1 or len({repr(p.selections["mlp"]) for p in mine}) != 1:
            raise fail(f"blocks that differ within stage {st.index}")
        a, ml = mine[0].selections["attention"], mine[0].selections["mlp"]
        if a.name != "levit" or ml.name != "bn_mlp":
            raise fail(f"attention '{a.name}' or mlp '{ml.name}' in stage {st.index} (LeViT: levit and bn_mlp)")
        attn.append(a.params)
        mlp.append(ml.params)
        ratios.append(mine[0].mlp_ratio)
        key_dims.add(a.params["key_dim"])
    acts = {p["act"] for p in mlp} | {spec.patch_embed.params["act"]}
    attn_acts, convs = {p["act"] for p in attn}, {p["conv"] for p in attn + mlp}
    for st in stages[1:]:
        t = st.transition.params
        if (st.transition.name != "levit_subsample" or (t["attn_ratio"], t["mlp_ratio"], t["stride"]) != (4.0, 2.0, 2)
                or t["num_heads"] not in (None, stages[st.index - 1].embed_dim // t["key_dim"])):
            raise fail(f"transition into stage {st.index} other than levit_subsample with attn_ratio 4, mlp_ratio 2, "
                       "stride 2 and the previous width // key_dim heads")
        key_dims.add(t["key_dim"])
        acts.add(t["act"])
        attn_acts.add(t["attn_act"] or t["act"])
        convs.add(t["conv"])
    if len(key_dims) != 1 or len(acts) != 1 or len(attn_acts) != 1 or len(convs) != 1:
        raise fail("key_dim, activations or conv that differ between layers (LeViT: one key_dim, one activation "
                   "for the stem and MLPs, one before the attention projections, all linear or all conv)")
    return dict(
        img_size=spec.img_size if isinstance(spec.img_size, int) else tuple(spec.img_size), in_chans=spec.in_chans,
        num_classes=spec.num_classes, embed_dim=tuple(st.embed_dim for st in stages), key_dim=key_dims.pop(),
        depth=tuple(st.depth for st in stages), num_heads=tuple(st.num_heads for st in stages),
        attn_ratio=tuple(p["attn_ratio"] for p in attn), mlp_ratio=tuple(ratios), stem_type=_STEMS[ph],
        down_op="subsample", act_layer=_ACT_ARG[acts.pop()], attn_act_layer=_ACT_ARG[attn_acts.pop()],
        use_conv=convs.pop(), global_pool="avg", drop_rate=0.0, drop_path_rate=0.0,
    )


def levit_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A vitlab LeViT's weights in timm's names (``LEVIT`` read backwards)."""
    levit_kwargs(model.spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return LEVIT.restore(sd, depths=[st.depth for st in model.spec.stage_plans()])


FAMILY = TimmFamily(
    "levit", classes=("timm.models.levit.Levit", "timm.models.levit.LevitDistilled"), reader=LevitReader,
    claims=_claims, timm_class=levit_class, kwargs=levit_kwargs, state_dict=levit_state_dict, tables=(LEVIT,),
)
