"""timm's ``Xcit`` (XCiT, El-Nouby et al. 2021) <-> a two-stage vitlab spec.

An XCiT is a staged vitlab model:

* stage 0: the ``xcit_stem`` patch embedding, the ``fourier`` position encoding and ``xcit``
  blocks (``xca`` attention, local patch interaction, MLP), without a class token;
* stage 1: a ``class_token`` transition and XCiT's class-attention blocks (``layers``: attention
  ``class_attn``, block ``xcit_class``), then the final norm and the pool.

The state-dict names are the ``XCIT`` family table (bare ``gamma1..3`` layer scales, the
class token, the class-attention blocks numbered on after ``blocks``), read forward on load and
inverted here on export.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from ...spec import ViTSpec
from ..bridge import Family
from ..export import refuser
from ..reader import Reader, fmt_float
from ..family import Exporting, TimmFamily

# timm's Xcit: bare layer scales ``gamma1..3`` (numbered as the official checkpoints), the class
# token as CaiT's, the class-attention blocks (``cls_attn_blocks``) numbered on after ``blocks``
XCIT = Family(
    "xcit", marker=r"(cls_attn_blocks\.|blocks\.\d+\.local_mp\.)",
    renames=(("cls_token", "transitions.1.cls_token"),
             ("blocks.{block}.gamma1", "blocks.{block}.ls1.gamma"),
             ("blocks.{block}.gamma2", "blocks.{block}.ls2.gamma"),
             ("blocks.{block}.gamma3", "blocks.{block}.ls3.gamma")),
    appended="cls_attn_blocks",
)

BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # timm's BatchNorm2d in the stem and the LPI: torch's defaults


class XcitReader(Reader):
    """Reads a timm ``Xcit`` instance (its modules and shapes, never its name)."""

    # --- leaf layers --------------------------------------------------------------------------

    def conv(self, c: Any, where: str, c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1,
             bias: bool = True) -> None:
        """Refuse ``c`` unless it is the ``Conv2d`` XCiT builds there (padding kernel // 2, zeros)."""
        if type(c) is not nn.Conv2d:
            raise self.unsupported(f"{type(c).__name__} instead of nn.Conv2d at {where}")
        want = ((c_in, c_out), (kernel, kernel), (stride, stride), (kernel // 2, kernel // 2), groups, bias)
        got = ((c.in_channels, c.out_channels), tuple(c.kernel_size), tuple(c.stride), tuple(c.padding), c.groups,
               c.bias is not None)
        if got != want or tuple(c.dilation) != (1, 1) or c.padding_mode != "zeros":
            raise self.unsupported(f"convolution at {where} other than XCiT's (in, out, kernel, stride, padding, "
                                   f"groups, bias) = {want}")

    def batchnorm(self, bn: Any, where: str, channels: int) -> None:
        if type(bn) is not nn.BatchNorm2d:
            raise self.unsupported(f"{type(bn).__name__} instead of nn.BatchNorm2d at {where}")
        if (bn.num_features != channels or not bn.affine or not bn.track_running_stats or bn.eps != BN_EPS
                or bn.momentum != BN_MOMENTUM):
            raise self.unsupported(f"BatchNorm2d at {where} other than an affine one with running statistics, "
                                   f"eps {BN_EPS} and momentum {BN_MOMENTUM}")

    def gammas(self, b: nn.Module, names: tuple[str, ...], where: str) -> float | None:
        """XCiT's bare layer-scale parameters (``gamma1`` ...): all there, of shape (D,), or all
        absent (timm's ``eta=None`` leaves the float 1.0). The init value is not kept in the model:
        read as 1.0, XCiT's ``eta`` of the 12-block models (any positive value builds the same layer)."""
        present = [isinstance(getattr(b, n, None), nn.Parameter) for n in names]
        if not any(present) and all(isinstance(getattr(b, n, None), float) and getattr(b, n) == 1.0 for n in names):
            return None
        D = self.m.embed_dim
        if not all(present) or any(tuple(getattr(b, n).shape) != (D,) for n in names):
            raise self.unsupported(f"layer scales {', '.join(names)} at {where} other than one ({D},) parameter each")
        return 1.0

    def no_drop_path(self, b: nn.Module, names: tuple[str, ...], where: str) -> None:
        if any(getattr(getattr(b, n), "drop_prob", 0.0) for n in names):
            raise self.unsupported(f"stochastic depth (drop_path_rate) at {where}: timm's XCiT drops every block "
                                   "at one rate and never the class-attention blocks, vitlab's rate grows with depth")

    # --- parts --------------------------------------------------------------------------------

    def patch_embed(self) -> dict:
        from timm.models.xcit import ConvPatchEmbed

        pe, D = self.m.patch_embed, self.m.embed_dim
        if type(pe) is not ConvPatchEmbed or not isinstance(pe.proj, nn.Sequential):
            raise self.unsupported(f"patch embedding {type(pe).__name__}")
        p = pe.patch_size
        n = p.bit_length() - 1 if isinstance(p, int) else 0
        if not n or p & (p - 1) or len(pe.proj) != 2 * n - 1:
            raise self.unsupported(f"convolutional patch embedding of {len(pe.proj)} layers for patch size {p}")
        acts = set()
        first = pe.proj[0][0] if isinstance(pe.proj[0], nn.Sequential) and len(pe.proj[0]) else None
        c_in = first.in_channels if isinstance(first, nn.Conv2d) else 0  # anything else is refused below
        widths = [c_in] + [D // 2 ** (n - 1 - i) for i in range(n)]
        for i, layer in enumerate(pe.proj):
            where = f"patch_embed.proj.{i}"
            if i % 2:
                acts.add(self.act(layer, where))
                continue
            if not isinstance(layer, nn.Sequential) or len(layer) != 2:
                raise self.unsupported(f"{type(layer).__name__} at {where} instead of XCiT's conv + BatchNorm")
            c_in, c_out = widths[i // 2], widths[i // 2 + 1]
            self.conv(layer[0], f"{where}.0", c_in, c_out, 3, 2, bias=False)
            self.batchnorm(layer[1], f"{where}.1", c_out)
        if len(acts) > 1:
            raise self.unsupported(f"different activations in the patch embedding: {sorted(acts)}")
        h, w = pe.img_size
        return {
            "img_size": [int(h), int(w)] if h != w else int(h),
            "patch_size": p,
            "in_chans": widths[0],
            "patch_embed": {"name": "xcit_stem", "params": {"act": acts.pop() if acts else "gelu"}},
        }

    def pos_embed(self) -> dict:
        from timm.models.xcit import PositionalEncodingFourier

        pe = self.m.pos_embed
        if pe is None:
            return {"name": "none"}
        if type(pe) is not PositionalEncodingFourier:
            raise self.unsupported(f"position encoding {type(pe).__name__}")
        if pe.eps != 1e-6 or pe.scale != 2 * math.pi or pe.hidden_dim % 2:
            raise self.unsupported("Fourier position encoding with another eps, scale or an odd hidden_dim")
        self.conv(pe.token_projection, "pos_embed.token_projection", 2 * pe.hidden_dim, self.m.embed_dim, 1, 1)
        return {"name": "fourier", "params": {"hidden_dim": int(pe.hidden_dim), "temperature": float(pe.temperature)}}

    def xca_block(self, b: nn.Module, i: int) -> dict:
        from timm.models.xcit import LPI, XCA, XCABlock

        where, D = f"blocks.{i}", self.m.embed_dim
        if type(b) is not XCABlock:
            raise self.unsupported(f"block type {type(b).__name__} at {where}")
        a = b.attn
        if type(a) is not XCA:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}.attn")
        qkv, proj = self.linear(a.qkv, f"{where}.attn.qkv"), self.linear(a.proj, f"{where}.attn.proj")
        h = a.num_heads
        if ((qkv.in_features, qkv.out_features) != (D, 3 * D) or (proj.in_features, proj.out_features) != (D, D)
                or D % h or tuple(a.temperature.shape) != (h, 1, 1)):
            raise self.unsupported(f"cross-covariance attention of another shape at {where}.attn")
        lpi = b.local_mp
        if type(lpi) is not LPI:
            raise self.unsupported(f"local patch interaction {type(lpi).__name__} at {where}.local_mp")
        k = lpi.conv1.kernel_size[0] if isinstance(lpi.conv1, nn.Conv2d) else 0
        self.conv(lpi.conv1, f"{where}.local_mp.conv1", D, D, k, 1, groups=D)
        self.conv(lpi.conv2, f"{where}.local_mp.conv2", D, D, k, 1, groups=D)
        self.batchnorm(lpi.bn, f"{where}.local_mp.bn", D)
        for n in ("norm1", "norm2", "norm3"):
            self.norm(getattr(b, n), f"{where}.{n}")
        self.no_drop_path(b, ("drop_path1", "drop_path2", "drop_path3"), where)
        return {
            "heads": h, "mlp": self.mlp(b.mlp, f"{where}.mlp"),
            "attn": {"qkv_bias": qkv.bias is not None, "proj_bias": proj.bias is not None,
                     "attn_drop": fmt_float(a.attn_drop.p)},
            "block": {"init_values": self.gammas(b, ("gamma1", "gamma2", "gamma3"), where), "lpi_kernel": int(k),
                      "lpi_act": self.act(lpi.act, f"{where}.local_mp.act")},
            "proj_drop": a.proj_drop.p,
        }

    def class_block(self, b: nn.Module, j: int) -> dict:
        from timm.models.cait import ClassAttn
        from timm.models.xcit import ClassAttentionBlock

        where, D = f"cls_attn_blocks.{j}", self.m.embed_dim
        if type(b) is not ClassAttentionBlock:
            raise self.unsupported(f"class-attention block {type(b).__name__} at {where}")
        a = b.attn
        if type(a) is not ClassAttn:
            raise self.unsupported(f"class attention {type(a).__name__} at {where}.attn")
        q, k, v = (self.linear(getattr(a, n), f"{where}.attn.{n}") for n in "qkv")
        proj = self.linear(a.proj, f"{where}.attn.proj")
        if any((t.in_features, t.out_features) != (D, D) for t in (q, k, v, proj)) or D % a.num_heads:
            raise self.unsupported(f"class attention of another shape at {where}.attn")
        if len({t.bias is not None for t in (q, k, v)}) != 1:
            raise self.unsupported(f"bias on only some of q / k / v at {where}.attn")
        for n in ("norm1", "norm2"):
            self.norm(getattr(b, n), f"{where}.{n}")
        self.no_drop_path(b, ("drop_path1", "drop_path2"), where)
        return {
            "heads": a.num_heads, "mlp": self.mlp(b.mlp, f"{where}.mlp"),
            "attn": {"qkv_bias": q.bias is not None, "proj_bias": proj.bias is not None,
                     "attn_drop": fmt_float(a.attn_drop.p)},
            "block": {"init_values": self.gammas(b, ("gamma1", "gamma2"), where), "tokens_norm": bool(b.tokens_norm)},
            "proj_drop": a.proj_drop.p,
        }

    # --- the whole model ----------------------------------------------------------------------

    def spec(self) -> ViTSpec:
        from timm.models.xcit import Xcit

        m = self.m
        if type(m) is not Xcit:
            raise self.unsupported(f"Xcit subclass {type(m).__name__}")
        D = m.embed_dim
        data: dict[str, Any] = {"name": self.name, **self.patch_embed(), "pos_embed": self.pos_embed()}
        if not len(m.blocks):
            raise self.unsupported("model without blocks")
        if m.cls_attn_blocks is None or not len(m.cls_attn_blocks):
            raise self.unsupported("model without class-attention blocks (the class token straight to the head)")
        if m.cls_token is None or tuple(m.cls_token.shape) != (1, 1, D) or m.num_prefix_tokens != 1:
            raise self.unsupported("prefix tokens other than one class token")
        blocks = [self.xca_block(b, i) for i, b in enumerate(m.blocks)]
        cls_blocks = [self.class_block(b, j) for j, b in enumerate(m.cls_attn_blocks)]
        for group, name in ((blocks, "blocks"), (cls_blocks, "cls_attn_blocks")):
            for i, b in enumerate(group[1:], start=1):
                if b != group[0]:
                    raise self.unsupported(f"blocks that differ ({name}.{i} is not configured like {name}.0)")
        first, cls = blocks[0], cls_blocks[0]
        if cls["heads"] != first["heads"] or cls["mlp"] != first["mlp"] or cls["proj_drop"] != first["proj_drop"]:
            raise self.unsupported("class-attention blocks with other heads, MLP or dropout than the blocks")
        heads, depth = first["heads"], len(blocks)
        data.update(
            num_classes=self.num_classes(D), class_token=False, reg_tokens=0, pre_norm=False,
            mlp_ratio=self.mlp_ratio(first["mlp"]["hidden"], "blocks.0.mlp"), dynamic_img_size=True,
            stages=[{"depth": depth, "embed_dim": D, "num_heads": heads},
                    {"depth": len(cls_blocks), "embed_dim": D, "num_heads": heads,
                     "transition": {"name": "class_token"}}],
            attention={"name": "xca", "params": first["attn"]},
            block={"name": "xcit", "params": first["block"]},
            mlp={"name": first["mlp"]["name"], "params": first["mlp"]["params"]},
            layers=[{"at": f"{depth}-{depth + len(cls_blocks) - 1}",
                     "attention": {"name": "class_attn", "params": cls["attn"]},
                     "block": {"name": "xcit_class", "params": cls["block"]}}],
        )
        self.norm(m.norm, "norm")
        data["final_norm"] = True
        pools = {"token": "token", "avg": "avg", "": "none"}
        if m.global_pool not in pools:
            raise self.unsupported(f"global_pool '{m.global_pool}'")
        data["pool"] = {"name": pools[m.global_pool]}
        data["norm"] = self.norm_selection()
        data["drop_rate"] = fmt_float(m.head_drop.p)
        data["pos_drop_rate"] = fmt_float(m.pos_drop.p)  # no prefix token yet: vitlab's dropout hits the same tokens
        data["proj_drop_rate"] = fmt_float(first["proj_drop"])

        return self.validated(data)


# --- spec -> timm --------------------------------------------------------------------------------

def is_xcit(spec: ViTSpec) -> bool:
    """Whether a spec is XCiT's: any block is an ``xcit`` or ``xcit_class`` block."""
    return any(p.selections["block"].name in ("xcit", "xcit_class") for p in spec.block_plans())


def _act_layer(name: str) -> type:
    from timm.layers.activations import GELUTanh, QuickGELU

    return {"gelu": nn.GELU, "gelu_tanh": GELUTanh, "quick_gelu": QuickGELU, "silu": nn.SiLU, "relu": nn.ReLU}[name]


def xcit_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``Xcit`` (any ``xcit_*`` name) for an XCiT spec (see the module docstring)."""
    fail = refuser(spec, "Xcit")
    stages = spec.stages or []
    if len(stages) != 2 or stages[1].transition is None or stages[1].transition.name != "class_token":
        raise fail("XCiT is two stages, the second led by a class_token transition")
    if (stages[0].embed_dim, stages[0].num_heads) != (stages[1].embed_dim, stages[1].num_heads):
        raise fail("stages of different widths or heads")
    plans = spec.block_plans()
    depth = stages[0].depth
    mlp, norm = spec.mlp, spec.norm
    for p in plans:
        attn, block = p.selections["attention"].name, p.selections["block"].name
        want = ("xca", "xcit") if p.index < depth else ("class_attn", "xcit_class")
        if (attn, block) != want:
            raise fail(f"block {p.index} is attention '{attn}' in block '{block}' (XCiT: {want[0]} in {want[1]})")
        if p.selections["mlp"] != mlp or p.selections["norm"] != norm or p.mlp_ratio != spec.mlp_ratio:
            raise fail(f"block {p.index} with its own MLP, norm or MLP ratio")
    xca, cls_attn = plans[0].selections["attention"].params, plans[depth].selections["attention"].params
    xb, cb = plans[0].selections["block"].params, plans[depth].selections["block"].params
    if xca.get("kv_heads") or xca.get("qk_norm") or not xca["proj_bias"] or not cls_attn["proj_bias"]:
        raise fail("xca with kv_heads, qk_norm or without output bias (timm's XCA has none of these)")
    if (xca["qkv_bias"], xca["attn_drop"]) != (cls_attn["qkv_bias"], cls_attn["attn_drop"]):
        raise fail("xca and class_attn with different qkv_bias or attn_drop (timm sets both with one argument)")
    if xb["init_values"] is None or cb["init_values"] != xb["init_values"]:
        raise fail("layer scales other than one init value on every block (timm's eta)")
    act = spec.patch_embed.params.get("act")
    if (spec.patch_embed.name != "xcit_stem" or spec.patch_hw[0] not in (8, 16) or spec.patch_hw[0] != spec.patch_hw[1]
            or spec.img_hw[0] % spec.patch_hw[0]):
        raise fail("patch embedding other than xcit_stem with 8 or 16 px patches dividing the image height")
    if mlp.name != "mlp" or not mlp.params["bias"] or mlp.params["norm"] or {mlp.params["act"], xb["lpi_act"]} != {act}:
        raise fail("an MLP other than timm's Mlp, or activations that differ between the stem, LPI and MLP "
                   "(timm's one act_layer)")
    if xb["lpi_kernel"] != 3:
        raise fail(f"lpi_kernel {xb['lpi_kernel']} (timm's LPI: 3)")
    pos = spec.pos_embed
    fourier = pos.name == "fourier" and (pos.params["hidden_dim"], pos.params["temperature"]) == (32, 10_000.0)
    if not (fourier or pos.name == "none"):
        raise fail(f"position encoding '{pos.name}' {pos.params} (timm: fourier with hidden_dim 32 and temperature "
                   "10000, or none)")
    if norm.name != "layernorm" or not norm.params["bias"]:
        raise fail(f"norm '{norm.name}' {norm.params} (timm: LayerNorm with bias)")
    pools = {"token": "token", "avg": "avg", "none": ""}
    if spec.pool.name not in pools or spec.pool.params.get("norm"):
        raise fail(f"pool '{spec.pool.name}' {spec.pool.params} (timm: token, avg or none, without a norm)")
    if spec.class_token or spec.reg_tokens or spec.pre_norm or not spec.final_norm:
        raise fail("a class or register token from the start, pre_norm or no final norm")
    if spec.drop_path_rate:
        raise fail("stochastic depth (timm's XCiT: one rate for every block, none in the class-attention blocks)")
    return dict(
        img_size=spec.img_size if isinstance(spec.img_size, int) else tuple(spec.img_size),
        patch_size=spec.patch_hw[0],
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
        global_pool=pools[spec.pool.name],
        embed_dim=spec.embed_dim,
        depth=depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=xca["qkv_bias"],
        drop_rate=spec.drop_rate,
        pos_drop_rate=spec.pos_drop_rate,
        proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=xca["attn_drop"],
        drop_path_rate=0.0,
        act_layer=_act_layer(act),
        norm_layer=functools.partial(nn.LayerNorm, eps=norm.params["eps"]),
        cls_attn_layers=stages[1].depth,
        use_pos_embed=pos.name == "fourier",
        eta=xb["init_values"],
        tokens_norm=cb["tokens_norm"],
    )


def xcit_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """An XCiT model's weights in timm's names: ``XCIT`` read backwards."""
    xcit_kwargs(model.spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return XCIT.restore(sd, lead=model.spec.stages[0].depth)


FAMILY = TimmFamily(
    "xcit", classes=("timm.models.xcit.Xcit",), reader=XcitReader,
    claims=is_xcit, timm_class="timm.models.xcit.Xcit", kwargs=xcit_kwargs, state_dict=xcit_state_dict, tables=(XCIT,),
)
