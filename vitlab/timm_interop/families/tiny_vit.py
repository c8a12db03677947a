"""timm's ``TinyVit`` (TinyViT, Wu et al. 2022; ``tiny_vit``) <-> a staged vitlab spec.

TinyViT is a vitlab model with ``stages``: a ``levit_stem`` of 4 px (``act: gelu``), no position
embedding and no prefix tokens, a first stage of ``mbconv`` blocks (timm's ``ConvLayer``: the
blocks' hidden width is their ``mlp_ratio``, timm's ``mbconv_expand_ratio``), then stages of
``tiny_vit`` blocks (``tiny_vit`` attention with that stage's window, a depthwise ``local_conv``,
``mlp`` after ``norm2``), a ``conv_merge`` transition into every stage after the first, and the
``adaptive_avg`` pool with its norm (timm's ``NormMlpClassifierHead`` without a hidden layer).
TinyVit takes no image size (its windows are padded): the spec's ``img_size`` is the model's
default input size (``pretrained_cfg``), else 224, and is not kept on export. Stage 0 has no
attention: its ``num_heads`` reads as 1, and its blocks' attention selection is unused.

The state-dict differences are the ``TINY_VIT`` table: timm keeps blocks and transitions per stage
(``stages.{stage}.blocks.{j}``, ``stages.{stage}.downsample``), its MLP's norm inside the MLP
(``mlp.norm``: vitlab's ``norm2``), its stem's convolutions as ``conv`` (``levit_stem``'s ``linear``)
and its head's norm and classifier as ``head.norm`` and ``head.fc``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import refuser, require
from ..family import Exporting, TimmFamily
from ..reader import fmt_float
from ..staged import StagedReader, stage_values, staged_state_dict

TINY_VIT = Family(
    "tiny_vit", marker=r"stages\.\d+\.blocks\.\d+\.(local_conv|conv1)\.conv\.",
    renames=(("patch_embed.conv1.conv.{rest}", "patch_embed.conv1.linear.{rest}"),
             ("patch_embed.conv2.conv.{rest}", "patch_embed.conv2.linear.{rest}"),
             ("stages.{stage}.blocks.{j}.mlp.norm.{rest}", "blocks.{block}.norm2.{rest}"),
             ("stages.{stage}.blocks.{j}.{rest}", "blocks.{block}.{rest}"),
             ("stages.{stage}.downsample.{rest}", "transitions.{stage}.{rest}"),
             ("head.norm.{rest}", "pool.norm.{rest}"),
             ("head.fc.{rest}", "head.{rest}")),
)

ACT_CLASSES = {"gelu": nn.GELU, "hardswish": nn.Hardswish, "silu": nn.SiLU, "relu": nn.ReLU}
_FIXED: dict[str, tuple[str, dict[str, Any]]] = {
    "pos_embed": ("none", {}), "pool": ("adaptive_avg", {"norm": True}), "transition": ("conv_merge", {}),
}


# --- timm -> spec ------------------------------------------------------------------------------------

class TinyVitReader(StagedReader):
    """Reads a timm ``TinyVit`` instance (its modules and shapes, never its name)."""

    timm_module = "timm.models.tiny_vit"
    model_cls = "TinyVit"

    def act(self, mod: nn.Module, where: str) -> str:
        if type(mod) is nn.Hardswish:
            return "hardswish"
        return super().act(mod, where)

    def conv_norm(self, cn: nn.Module, where: str, c_in: int, c_out: int, k: int = 1, s: int = 1,
                  depthwise: bool = False) -> None:
        """timm's ``ConvNorm``: a conv without bias of this geometry, then BatchNorm2d (eps 1e-5)."""
        c, bn = getattr(cn, "conv", None), getattr(cn, "bn", None)
        want = ((c_in, c_out), (k, k), (s, s), (k // 2, k // 2), (1, 1), c_out if depthwise else 1)
        if (not self.is_timm(cn, "ConvNorm") or type(c) is not nn.Conv2d or c.bias is not None
                or c.padding_mode != "zeros" or ((c.in_channels, c.out_channels), tuple(c.kernel_size), tuple(c.stride),
                                                 tuple(c.padding), tuple(c.dilation), c.groups) != want):
            raise self.unsupported(f"conv + BatchNorm other than {want} without bias at {where}")
        if type(bn) is not nn.BatchNorm2d or not bn.affine or not bn.track_running_stats or bn.eps != 1e-5:
            raise self.unsupported(f"BatchNorm other than affine with running stats and eps 1e-5 at {where}.bn")

    def one_act(self, mod: nn.Module, names: tuple[str, ...], where: str) -> str:
        acts = {self.act(getattr(mod, n), f"{where}.{n}") for n in names}
        if len(acts) != 1:
            raise self.unsupported(f"activations that differ ({sorted(acts)}) at {where}")
        return acts.pop()

    def stem(self) -> tuple[int, str]:
        pe = self.m.patch_embed
        if not self.is_timm(pe, "PatchEmbed"):
            raise self.unsupported(f"patch embedding {type(pe).__name__}")
        D = pe.conv2.conv.out_channels
        self.conv_norm(pe.conv1, "patch_embed.conv1", pe.conv1.conv.in_channels, D // 2, 3, 2)
        self.conv_norm(pe.conv2, "patch_embed.conv2", D // 2, D, 3, 2)
        return D, self.act(pe.act, "patch_embed.act")

    def mbconv(self, b: nn.Module, dim: int, where: str) -> tuple[dict, int]:
        if not self.is_timm(b, "MBConv"):
            raise self.unsupported(f"block type {type(b).__name__} at {where}")
        mid = b.conv1.conv.out_channels
        self.conv_norm(b.conv1, f"{where}.conv1", dim, mid)
        self.conv_norm(b.conv2, f"{where}.conv2", mid, mid, 3, depthwise=True)
        self.conv_norm(b.conv3, f"{where}.conv3", mid, dim)
        return {"name": "mbconv", "params": {"act": self.one_act(b, ("act1", "act2", "act3"), where)}}, mid

    def merging(self, ds: nn.Module, in_dim: int, where: str) -> tuple[dict, int]:
        if not self.is_timm(ds, "PatchMerging"):
            raise self.unsupported(f"stage transition {type(ds).__name__} at {where}")
        out = ds.conv1.conv.out_channels
        self.conv_norm(ds.conv1, f"{where}.conv1", in_dim, out)
        self.conv_norm(ds.conv2, f"{where}.conv2", out, out, 3, 2, depthwise=True)
        self.conv_norm(ds.conv3, f"{where}.conv3", out, out)
        return {"name": "conv_merge", "params": {"act": self.one_act(ds, ("act1", "act2"), where)}}, out

    def tiny_block(self, b: nn.Module, dim: int, where: str) -> tuple[dict, dict, dict, int]:
        """A ``TinyVitBlock``: (attention, mlp, block selections, MLP hidden width)."""
        if not self.is_timm(b, "TinyVitBlock") or not self.is_timm(b.attn, "Attention") \
                or not self.is_timm(b.mlp, "NormMlp"):
            raise self.unsupported(f"block type {type(b).__name__} at {where}")
        a, mlp, w = b.attn, b.mlp, b.window_size
        h = a.num_heads
        qkv, proj = self.linear(a.qkv, f"{where}.attn.qkv"), self.linear(a.proj, f"{where}.attn.proj")
        if (a.key_dim * h != dim or a.val_dim != a.key_dim or tuple(a.resolution) != (w, w) or qkv.bias is None
                or proj.bias is None or qkv.out_features != 3 * dim or tuple(a.attention_biases.shape) != (h, w * w)):
            raise self.unsupported(f"attention other than heads of width / heads, values as wide as keys, biased "
                                   f"projections and a bias per offset in its window at {where}.attn")
        self.norm(a.norm, f"{where}.attn.norm")
        self.norm(mlp.norm, f"{where}.mlp.norm")
        fc1, fc2 = self.linear(mlp.fc1, f"{where}.mlp.fc1"), self.linear(mlp.fc2, f"{where}.mlp.fc2")
        if fc1.bias is None or fc2.bias is None or fc2.out_features != dim or mlp.drop1.p or mlp.drop2.p:
            raise self.unsupported(f"MLP without biases, of another width, or with dropout (proj_drop_rate) at {where}")
        k = b.local_conv.conv.kernel_size[0]
        self.conv_norm(b.local_conv, f"{where}.local_conv", dim, dim, k, depthwise=True)
        return ({"name": "tiny_vit", "params": {"window_size": int(w)}},
                {"name": "mlp", "params": {"act": self.act(mlp.act, f"{where}.mlp.act")}},
                {"name": "tiny_vit", "params": {"local_conv_size": int(k)}}, fc1.out_features)

    def head(self) -> dict[str, Any]:
        from timm.layers import LayerNorm2d, NormMlpClassifierHead

        hd = self.m.head
        if (type(hd) is not NormMlpClassifierHead or hd.global_pool.pool_type != "avg" or not self.is_id(hd.pre_logits)
                or type(hd.norm) is not LayerNorm2d or not hd.norm.elementwise_affine or hd.norm.bias is None):
            raise self.unsupported("head other than an average pool, LayerNorm2d and a linear classifier")
        self.norms["head.norm"] = ("layernorm", (("bias", True), ("eps", float(hd.norm.eps))))
        num_classes = 0 if self.is_id(hd.fc) else self.linear(hd.fc, "head.fc").out_features
        return {"pool": {"name": "adaptive_avg", "params": {"norm": True}}, "num_classes": num_classes,
                "drop_rate": fmt_float(hd.drop.p)}

    def spec(self) -> ViTSpec:
        m = self.own_model()
        width, stem_act = self.stem()
        size = tuple((getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:])
        data: dict[str, Any] = {
            "name": self.name, "img_size": size[0] if size[0] == size[1] else list(size), "patch_size": 4,
            "in_chans": m.patch_embed.conv1.conv.in_channels, "class_token": False, "reg_tokens": 0,
            "patch_embed": {"name": "levit_stem", "params": {"act": stem_act}}, "pos_embed": {"name": "none"},
            "pre_norm": False, "final_norm": False, **self.head()}
        stages, attns, mlps, blocks, ratios, rates, transitions = [], [], [], [], [], [], []
        for s, stage in enumerate(m.stages):
            where = f"stages.{s}"
            entry: dict[str, Any] = {}
            if s == 0:
                if not self.is_timm(stage, "ConvLayer"):
                    raise self.unsupported(f"first stage {type(stage).__name__} (TinyViT: MBConv blocks)")
            else:
                if not self.is_timm(stage, "TinyVitStage"):
                    raise self.unsupported(f"stage {type(stage).__name__} at {where}")
                entry["transition"], width = self.merging(stage.downsample, width, f"{where}.downsample")
                transitions.append(entry["transition"])
            if not len(stage.blocks):
                raise self.unsupported(f"stage {s} without blocks")
            heads = 1
            for j, b in enumerate(stage.blocks):
                bw = f"{where}.blocks.{j}"
                if s == 0:
                    block, hidden = self.mbconv(b, width, bw)
                    attn, mlp = None, None
                    rates.append(float(getattr(b.drop_path, "drop_prob", 0.0)))
                else:
                    attn, mlp, block, hidden = self.tiny_block(b, width, bw)
                    heads = b.num_heads
                    rates.append(float(getattr(b.drop_path1, "drop_prob", 0.0)))
                attns.append(attn)
                mlps.append(mlp)
                blocks.append(block)
                ratios.append(self.mlp_ratio(hidden, bw, width))
            stages.append({"depth": len(stage.blocks), "embed_dim": width, "num_heads": heads, **entry})
        first = next((a for a in attns if a is not None), {"name": "tiny_vit"})
        first_mlp = next((x for x in mlps if x is not None), {"name": "mlp", "params": {"act": stem_act}})
        # stage 0's blocks build no attention or MLP: they take the first transformer stage's, unused
        attns = [a or first for a in attns]
        mlps = [x or first_mlp for x in mlps]
        if len({repr(t) for t in transitions}) <= 1:  # one transition for every stage: the recipe's
            for st in stages:
                st.pop("transition", None)
        data["transition"] = transitions[0] if transitions else {"name": "conv_merge"}
        layers = []
        for key, values in (("attention", attns), ("mlp", mlps), ("block", blocks), ("mlp_ratio", ratios)):
            data[key], more = self.per_block(key, values)
            layers += more
        data.update(stages=stages, layers=layers, norm=self.norm_selection(), proj_drop_rate=0.0,
                    drop_path_rate=fmt_float(rates[-1]) if len(rates) > 1 else 0.0)
        return self.validated(data)


# --- spec -> timm -----------------------------------------------------------------------------------

def _claims(spec: ViTSpec) -> bool:
    return spec.stages is not None and any(p.selections["block"].name == "mbconv" for p in spec.block_plans())


def tiny_vit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``TinyVit`` (any ``tiny_vit_*`` name) for a staged spec."""
    fail = refuser(spec, "TinyVit")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or spec.final_norm or spec.proj_drop_rate:
        raise fail("prefix tokens, pre_norm, a final norm or proj_drop_rate (TinyViT: none of them)")
    if spec.patch_embed.name != "levit_stem" or spec.patch_hw != (4, 4):
        raise fail(f"patch embedding '{spec.patch_embed.name}' of {spec.patch_hw} (TinyViT: levit_stem of 4 px)")
    require(spec, ex.registry, fail, _FIXED, {"transition": ("act",)}, "TinyViT")
    n = spec.norm
    if n.name != "layernorm" or not n.params.get("bias", True) or n.params.get("eps") != 1e-5:
        raise fail(f"norm '{n.name}' {n.params} (TinyViT: LayerNorm, eps 1e-5, with bias)")
    stages = spec.stage_plans()
    kinds = stage_values(spec, fail, "block", lambda p: p.selections["block"].name)
    if kinds[0] != "mbconv" or any(k != "tiny_vit" for k in kinds[1:]) or len(stages) < 2:
        raise fail(f"stage blocks {kinds} (TinyViT: mbconv, then tiny_vit in every later stage)")
    later = lambda key: stage_values(spec, fail, key, lambda p: p.selections[key])[1:]  # noqa: E731
    attn, mlp, block = later("attention"), later("mlp"), later("block")
    defaults = lambda kind, sel: ex.registry.get(kind, sel.name).cls.Params().model_dump(mode="json")  # noqa: E731
    window_sizes = []
    for a in attn:
        other = {k: v for k, v in a.params.items() if k != "window_size" and v != defaults("attention", a)[k]}
        if a.name != "tiny_vit" or other:
            raise fail(f"attention '{a.name}' with {other} (TinyViT: tiny_vit, only window_size set)")
        window_sizes.append(a.params["window_size"])
    acts = {spec.patch_embed.params["act"], stages[1].transition.params["act"]}
    acts |= {sel.params["act"] for sel in stage_values(spec, fail, "block", lambda p: p.selections["block"])[:1]}
    for sel in mlp:
        other = {k: v for k, v in sel.params.items() if k != "act" and v != defaults("mlp", sel)[k]}
        if sel.name != "mlp" or other:
            raise fail(f"mlp '{sel.name}' with {other} (TinyViT: mlp)")
        acts.add(sel.params["act"])
    if len({repr(t.transition) for t in stages[1:]}) != 1 or len(acts) != 1 or acts & {"gelu_tanh", "quick_gelu"}:
        raise fail(f"activations {sorted(acts)} or transitions that differ (TinyViT: one act_layer)")
    ratios = stage_values(spec, fail, "mlp_ratio", lambda p: p.mlp_ratio)
    convs = {b.params["local_conv_size"] for b in block}
    if len(set(ratios[1:])) != 1 or len(convs) != 1:
        raise fail("MLP ratios or local_conv_size that differ between stages after the first")
    return dict(
        in_chans=spec.in_chans, num_classes=spec.num_classes, global_pool="avg",
        embed_dims=tuple(st.embed_dim for st in stages), depths=tuple(st.depth for st in stages),
        num_heads=tuple(st.num_heads for st in stages), window_sizes=(window_sizes[0], *window_sizes),
        mlp_ratio=ratios[1], drop_rate=spec.drop_rate, proj_drop_rate=0.0, drop_path_rate=spec.drop_path_rate,
        mbconv_expand_ratio=ratios[0], local_conv_size=convs.pop(), act_layer=ACT_CLASSES[acts.pop()],
    )


FAMILY = TimmFamily(
    "tiny_vit", classes=("timm.models.tiny_vit.TinyVit",), reader=TinyVitReader, claims=_claims,
    timm_class="timm.models.tiny_vit.TinyVit", kwargs=tiny_vit_kwargs,
    state_dict=staged_state_dict(TINY_VIT, tiny_vit_kwargs), unkept=("img_size",), tables=(TINY_VIT,),
)
