"""timm ``VisionTransformer`` -> ``ViTSpec``: read what the instance is (its modules, attributes and
parameter shapes), never its name.

Every feature vitlab cannot express raises ``SpecError`` naming that feature, so a converted spec
is always the same function as the timm model.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import Problem, SpecError, did_you_mean
from ..spec import ViTSpec


class Unsupported(SpecError):
    """A timm model feature with no vitlab equivalent (the message names it)."""


def _timm():
    import timm  # lazily: ``import vitlab`` never imports timm

    return timm


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``, on the meta device when possible (only the
    structure is needed, so even giant models cost nothing). Unknown names raise ``SpecError``."""
    timm = _timm()
    if not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise SpecError(f"unknown timm model '{name}'{hint}")
    kwargs = {"pretrained": False, **kwargs}
    if kwargs.get("pretrained"):
        raise SpecError("vitlab never downloads weights: create timm models with pretrained=False")
    try:
        return timm.create_model(name, device="meta", **kwargs)
    except TypeError:  # an entrypoint without device support: build it for real
        return timm.create_model(name, **kwargs)


def _fmt_float(x: float) -> float:
    """Drop float32 noise (0.10000000149 -> 0.1) from rates read back from modules."""
    return float(f"{float(x):.7g}")


class _Reader:
    def __init__(self, model: nn.Module, name: str, label: str):
        self.m = model
        self.name = name
        self.label = label  # "timm model 'vit_x'" or "timm VisionTransformer"
        self.norms: dict[str, tuple[str, tuple]] = {}  # where -> (component name, params items)
        self.acts: dict[str, str] = {}

    # --- errors -------------------------------------------------------------------------------

    def unsupported(self, feature: str) -> Unsupported:
        return Unsupported([Problem("", f"cannot convert {self.label}: unsupported {feature}")])

    # --- leaf layers --------------------------------------------------------------------------

    def norm(self, mod: nn.Module, where: str) -> None:
        from timm.layers import LayerNorm as TimmLayerNorm, RmsNorm

        t = type(mod)
        if t in (nn.LayerNorm, TimmLayerNorm):
            if not mod.elementwise_affine:
                raise self.unsupported(f"LayerNorm without affine weight at {where}")
            cfg = ("layernorm", (("bias", mod.bias is not None), ("eps", float(mod.eps))))
        elif t is RmsNorm or t is getattr(nn, "RMSNorm", None):
            if not mod.elementwise_affine:
                raise self.unsupported(f"RmsNorm without affine weight at {where}")
            if mod.eps is None:
                raise self.unsupported(f"RMSNorm with eps=None (dtype-dependent eps) at {where}")
            cfg = ("rmsnorm", (("eps", float(mod.eps)),))
        else:
            raise self.unsupported(f"norm layer {t.__module__}.{t.__name__} at {where}")
        if len(tuple(mod.normalized_shape)) != 1:
            raise self.unsupported(f"norm over more than the last dimension at {where}")
        self.norms[where] = cfg

    def act(self, mod: nn.Module, where: str) -> str:
        from timm.layers import activations as A

        t = type(mod)
        if t is nn.GELU:
            name = "gelu" if mod.approximate == "none" else "gelu_tanh"
        elif t is A.GELU:
            name = "gelu"
        elif t is A.GELUTanh:
            name = "gelu_tanh"
        elif t is A.QuickGELU:
            name = "quick_gelu"
        elif t in (nn.SiLU, A.Swish):
            name = "silu"
        elif t is nn.ReLU:
            name = "relu"
        else:
            raise self.unsupported(f"activation {t.__module__}.{t.__name__} at {where}")
        self.acts[where] = name
        return name

    @staticmethod
    def is_id(mod: Any) -> bool:
        return mod is None or isinstance(mod, nn.Identity)

    def linear(self, mod: Any, where: str) -> nn.Linear:
        if type(mod) is not nn.Linear:
            raise self.unsupported(f"{type(mod).__name__} instead of nn.Linear at {where}")
        return mod

    def mlp_ratio(self, hidden: int, where: str, dim: int | None = None) -> float:
        """A ratio r with ``int(D * r) == hidden`` (vitlab derives the hidden width from it)."""
        D = dim or self.m.embed_dim
        r = hidden / D
        for _ in range(4):
            if int(D * r) == hidden:
                return r
            r = math.nextafter(r, math.inf)
        raise self.unsupported(f"MLP hidden width {hidden} at {where}")  # pragma: no cover

    # --- parts --------------------------------------------------------------------------------

    def equivalent(self, kind: str, module: nn.Module, where: str) -> dict | None:
        """A plugin component declared as this module's twin (``vitlab_timm_equivalents``): its
        selection, with the params the plugin reads off the module; ``None`` if none is."""
        from ..plugins import get_registry

        eq = get_registry().timm_equivalent(kind, module)
        if eq is None:
            return None
        try:
            params = eq.read(module)
        except Exception as exc:  # noqa: BLE001 - a plugin's refusal, or its bug: either way not this model
            raise self.unsupported(f"{type(module).__name__} at {where} ({kind} '{eq.name}' of plugin "
                                   f"'{eq.provider}': {exc})") from None
        return {"name": eq.name, "params": dict(params)}

    def qkv_attention(self, a: nn.Module, where: str, check_proj: bool = True) -> dict:
        """The params of a timm attention built like ``Attention`` (``qkv``, ``proj``, ``q_norm`` /
        ``k_norm`` over heads of embed_dim) in another family's module (SAM's, relpos's)."""
        D = self.m.embed_dim
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if a.num_heads * a.head_dim != D or qkv.out_features != 3 * D or (check_proj and proj.out_features != D):
            raise self.unsupported(f"attention width other than embed_dim {D} at {where}")
        qk_norm = not self.is_id(a.q_norm)
        if qk_norm:
            self.norm(a.q_norm, f"{where}.q_norm")
            self.norm(a.k_norm, f"{where}.k_norm")
        return {"qkv_bias": qkv.bias is not None, "proj_bias": proj.bias is not None, "qk_norm": qk_norm,
                "attn_drop": _fmt_float(a.attn_drop.p)}

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.layers import Attention, DiffAttention

        if (sel := self.equivalent("attention", a, where)) is not None:
            drop = getattr(a, "proj_drop", None)
            return {**sel, "heads": a.num_heads, "proj_drop": getattr(drop, "p", 0.0)}
        t = type(a)
        if t not in (Attention, DiffAttention):
            raise self.unsupported(f"attention layer {t.__name__} at {where}")
        D = dim or self.m.embed_dim
        diff = t is DiffAttention
        width = a.num_heads * a.head_dim * (2 if diff else 1)  # DiffAttention's head_dim is half a head
        if width != D or (not diff and a.attn_dim != D):
            raise self.unsupported(f"attention width {width} != embed_dim {D} (attn_head_dim) at {where}")
        subln = not self.is_id(getattr(a, "norm", None))  # scale_attn_norm: BEiT-3's sub-LN
        if subln:
            self.norm(a.norm, f"{where}.norm")
        if getattr(a, "gate", None) is not None:
            raise self.unsupported(f"gated attention output at {where}")
        qkv, proj = self.linear(a.qkv, f"{where}.qkv"), self.linear(a.proj, f"{where}.proj")
        if proj.out_features != D:
            raise self.unsupported(f"attention output width {proj.out_features} at {where}")
        qk_norm = not self.is_id(a.q_norm)
        if qk_norm != (not self.is_id(a.k_norm)):
            raise self.unsupported(f"q_norm without k_norm at {where}")
        if qk_norm:
            self.norm(a.q_norm, f"{where}.q_norm")
            self.norm(a.k_norm, f"{where}.k_norm")
        params = {"qkv_bias": qkv.bias is not None, "proj_bias": proj.bias is not None, "qk_norm": qk_norm,
                  "attn_drop": _fmt_float(a.attn_drop.p)}
        if diff:
            return {"heads": a.num_heads, "proj_drop": a.proj_drop.p, "name": "mhsa_diff",
                    "params": {**params, **self.differential(a, where), "subln": subln}}
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p,
                "name": "mhsa_subln" if subln else "mhsa"}

    def differential(self, a: nn.Module, where: str, block_index: int | None = None) -> dict:
        """What ``mhsa_diff`` needs of timm's differential attention (``DiffAttention`` or a
        ``DiffParallelScalingBlock``): its fixed heads' norm, its λ parameterisation and, given the
        block's index, that λ_init is that block's."""
        from timm.layers import RmsNorm

        sub = a.sub_norm
        if type(sub) is not RmsNorm or not sub.elementwise_affine or sub.eps != 1e-5:
            raise self.unsupported(f"differential attention heads' norm other than RmsNorm(eps=1e-5) at {where}")
        if block_index is not None and not math.isclose(a.lambda_init, 0.8 - 0.6 * math.exp(-0.3 * block_index)):
            raise self.unsupported(f"differential attention lambda_init {a.lambda_init:.4g} other than block "
                                   f"{block_index}'s at {where}")
        return {"dual_lambda": bool(a.dual_lambda)}

    def mlp(self, mlp: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.layers import GluMlp, Mlp, SwiGLU

        if (sel := self.equivalent("mlp", mlp, where)) is not None:
            fc1 = getattr(mlp, "fc1", None)
            if not isinstance(fc1, nn.Linear):  # the hidden width is fc1's, as in timm's Mlp
                raise self.unsupported(f"MLP {type(mlp).__name__} at {where} without an fc1 Linear (its hidden width)")
            drop = getattr(mlp, "drop2", None)
            return {**sel, "hidden": fc1.out_features, "drop": getattr(drop, "p", 0.0)}
        t = type(mlp)
        if t is Mlp:
            fc1, fc2 = self.linear(mlp.fc1, f"{where}.fc1"), self.linear(mlp.fc2, f"{where}.fc2")
            name, hidden = "mlp", fc1.out_features
            biases = {fc1.bias is not None, fc2.bias is not None}
            extra = {"act": self.act(mlp.act, f"{where}.act")}
        elif t in (SwiGLU, GluMlp):
            if not isinstance(mlp.act, nn.SiLU):
                raise self.unsupported(f"gated MLP with {type(mlp.act).__name__} gate (only SwiGLU) at {where}")
            if t is SwiGLU:
                fc1 = self.linear(mlp.fc1_g, f"{where}.fc1_g")
                fx = self.linear(mlp.fc1_x, f"{where}.fc1_x")
                hidden = fc1.out_features
                biases = {fc1.bias is not None, fx.bias is not None}
            else:
                if mlp.gate_last:
                    raise self.unsupported(f"GluMlp with the gate in the second half (gate_last=True) at {where}")
                fc1 = self.linear(mlp.fc1, f"{where}.fc1")
                hidden = fc1.out_features // 2
                biases = {fc1.bias is not None}
            fc2 = self.linear(mlp.fc2, f"{where}.fc2")
            biases.add(fc2.bias is not None)
            name, extra = "swiglu", {}
            self.acts[f"{where}.act"] = "silu"
        else:
            raise self.unsupported(f"MLP layer {t.__name__} at {where}")
        if len(biases) != 1:
            raise self.unsupported(f"MLP with bias on only one of its projections at {where}")
        if fc2.out_features != (dim or self.m.embed_dim) or fc2.in_features != hidden:
            raise self.unsupported(f"MLP output width {fc2.out_features} at {where}")
        has_norm = not self.is_id(mlp.norm)
        if has_norm:
            self.norm(mlp.norm, f"{where}.norm")
        return {"name": name, "params": {"bias": biases.pop(), "norm": has_norm, **extra}, "hidden": hidden,
                "drop": mlp.drop2.p}

    def layer_scale(self, ls: nn.Module, where: str) -> float | None:
        from timm.layers import LayerScale

        if self.is_id(ls):
            return None
        if type(ls) is not LayerScale:
            raise self.unsupported(f"layer scale {type(ls).__name__} at {where}")
        init = getattr(ls, "init_values", None)
        if not isinstance(init, (int, float)) or init <= 0:
            init = 1e-5  # only the initial value of a trained scale; any positive value builds the same layer
        return _fmt_float(init)

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> dict:
        """Block ``i`` of width ``dim`` (default: the model's embed_dim), named ``where`` in messages."""
        from timm.models.vision_transformer import (
            Block, DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock, ResPostBlock,
        )

        where = where or f"blocks.{i}"
        t = type(b)
        D = dim or self.m.embed_dim
        if (sel := self.equivalent("block", b, where)) is not None:  # a plugin's block around timm's parts
            for n in ("norm1", "norm2"):
                if hasattr(b, n):
                    self.norm(getattr(b, n), f"{where}.{n}")
            return {"attn": self.attention(b.attn, f"{where}.attn", D), "mlp": self.mlp(b.mlp, f"{where}.mlp", D),
                    "block": sel, "drop_path": float(getattr(getattr(b, "drop_path1", None), "drop_prob", 0.0))}
        if t in (Block, ResPostBlock):
            read = self.two_branch(b, where, post=t is ResPostBlock, dim=D)
            if read["attn"]["name"] == "mhsa_diff":
                self.differential(b.attn, f"{where}.attn", i)
            return read
        elif t is ParallelThingsBlock:
            return self.parallel_things(b, i, where, D)
        elif t in (ParallelScalingBlock, DiffParallelScalingBlock):
            in_proj = self.linear(b.in_proj, f"{where}.in_proj")
            hidden = in_proj.out_features - 3 * D
            if list(b.in_split) != [hidden, D, D, D] or hidden <= 0:
                raise self.unsupported(f"ParallelScalingBlock split {b.in_split} at {where}")
            self.norm(b.in_norm, f"{where}.in_norm")
            qk_norm = not self.is_id(b.q_norm)
            if qk_norm:
                self.norm(b.q_norm, f"{where}.q_norm")
                self.norm(b.k_norm, f"{where}.k_norm")
            if b.out_proj is not None:
                out = self.linear(b.out_proj, f"{where}.out_proj")
                proj_bias = out.bias is not None
            else:
                a_out = self.linear(b.attn_out_proj, f"{where}.attn_out_proj")
                m_out = self.linear(b.mlp_out_proj, f"{where}.mlp_out_proj")
                proj_bias = a_out.bias is not None
                if proj_bias != (m_out.bias is not None):
                    raise self.unsupported(f"bias on only one output projection at {where}")
            attn = {"heads": b.num_heads, "proj_drop": b.mlp_drop.p,
                    "params": {"qkv_bias": in_proj.bias is not None, "proj_bias": proj_bias, "qk_norm": qk_norm,
                               "attn_drop": _fmt_float(b.attn_drop.p)}}
            if t is DiffParallelScalingBlock:  # the attention half is differential, its q / k split in two
                attn["name"] = "mhsa_diff"
                attn["params"].update(self.differential(b, where, i), subln=False)
            # the MLP's fc1 always has a bias (in_proj's bias or mlp_bias); a fused or bias-free output
            # projection loads as zeros in mlp.fc2.bias
            act = self.act(b.mlp_act, f"{where}.mlp_act")
            mlp = {"name": "mlp", "params": {"bias": True, "norm": False, "act": act}, "hidden": hidden,
                   "drop": b.mlp_drop.p}
            ls = self.layer_scale(b.ls, f"{where}.ls")
            block = {"name": "parallel", "params": {"init_values": ls, "shared_norm": True}}
            drop_path = getattr(b.drop_path, "drop_prob", 0.0)
        else:
            raise self.unsupported(f"block type {t.__module__}.{t.__name__} at {where}")
        return {"attn": attn, "mlp": mlp, "block": block, "drop_path": float(drop_path)}

    def parallel_things(self, b: nn.Module, i: int, where: str, dim: int) -> dict:
        """timm's ``ParallelThingsBlock``: ``num_parallel`` branches of (norm, attn, ls) side by side,
        then as many of (norm, mlp, ls); every branch configured alike (``parallel_branches``)."""
        branches = []
        for j in range(b.num_parallel):
            a, f = b.attns[j], b.ffns[j]
            attn = self.attention(a.attn, f"{where}.attns.{j}.attn", dim)
            if attn["name"] == "mhsa_diff":
                self.differential(a.attn, f"{where}.attns.{j}.attn", i)
            mlp = self.mlp(f.mlp, f"{where}.ffns.{j}.mlp", dim)
            self.norm(a.norm, f"{where}.attns.{j}.norm")
            self.norm(f.norm, f"{where}.ffns.{j}.norm")
            ls = self.layer_scale(a.ls, f"{where}.attns.{j}.ls")
            if (ls is None) != (self.layer_scale(f.ls, f"{where}.ffns.{j}.ls") is None):
                raise self.unsupported(f"layer scale on only one branch at {where}")
            branches.append((attn, mlp, ls))
        if any(br != branches[0] for br in branches[1:]):
            raise self.unsupported(f"parallel branches configured differently at {where}")
        attn, mlp, ls = branches[0]
        block = {"name": "parallel_branches", "params": {"branches": b.num_parallel, "init_values": ls}}
        return {"attn": attn, "mlp": mlp, "block": block,
                "drop_path": float(getattr(b.attns[0].drop_path, "drop_prob", 0.0))}

    def parts(self, b: nn.Module, where: str, types: tuple[type, ...] | None = None,
              dim: int | None = None) -> tuple[dict, dict]:
        """A block of ``norm1, attn, norm2, mlp`` (one of ``types`` when given, else refused by
        name): its attention and MLP read, its norms checked."""
        if types is not None and type(b) not in types:
            raise self.unsupported(f"block type {type(b).__module__}.{type(b).__name__} at {where}")
        attn = self.attention(b.attn, f"{where}.attn", dim)
        mlp = self.mlp(b.mlp, f"{where}.mlp", dim)
        self.norm(b.norm1, f"{where}.norm1")
        self.norm(b.norm2, f"{where}.norm2")
        return attn, mlp

    def two_branch(self, b: nn.Module, where: str, post: bool, dim: int | None = None) -> dict:
        """A timm block of ``norm1, attn, ls1, norm2, mlp, ls2`` (``Block`` and its kin in other
        families): pre-norm with layer scale on both branches or none, or res-post-norm (``post``)."""
        attn, mlp = self.parts(b, where, dim=dim)
        if post:  # timm's init_values only initialise a res-post block's norm weights (no layer scale)
            block = {"name": "respostnorm", "params": {"init_values": None}}
        else:
            ls1, ls2 = self.layer_scale(b.ls1, f"{where}.ls1"), self.layer_scale(b.ls2, f"{where}.ls2")
            if (ls1 is None) != (ls2 is None):
                raise self.unsupported(f"layer scale on only one branch at {where}")
            block = {"name": "prenorm", "params": {"init_values": ls1}}
        return {"attn": attn, "mlp": mlp, "block": block, "drop_path": float(getattr(b.drop_path1, "drop_prob", 0.0))}

    def patch_embed(self) -> dict:
        from timm.layers import HybridEmbed, PatchEmbed

        pe = self.m.patch_embed
        if type(pe) is HybridEmbed:  # a CNN backbone's feature map as the patches (``hybrid``)
            from .hybrid import read_hybrid_embed

            return read_hybrid_embed(self, pe)
        if type(pe) is not PatchEmbed:
            raise self.unsupported(f"patch embedding {type(pe).__name__}")
        if pe.img_size is None:
            raise self.unsupported("patch embedding without a fixed img_size")
        conv = pe.proj
        if type(conv) is not nn.Conv2d:
            raise self.unsupported(f"patch projection {type(conv).__name__}")
        ps = tuple(pe.patch_size)
        if (tuple(conv.kernel_size) != ps or tuple(conv.stride) != ps or tuple(conv.padding) != (0, 0)
                or tuple(conv.dilation) != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"):
            raise self.unsupported("patch projection other than a conv with kernel = stride = patch size")
        if conv.out_channels != self.m.embed_dim:
            raise self.unsupported(f"patch projection width {conv.out_channels}")
        h, w = pe.img_size
        pad = bool(getattr(pe, "dynamic_img_pad", False))
        crops = bool(h % ps[0] or w % ps[1])
        if crops and (pad or ps[0] != ps[1] or getattr(self.m, "dynamic_img_size", False)):
            raise self.unsupported(f"image size {h}x{w} not divisible by patch size {ps[0]}x{ps[1]} "
                                   "(timm crops) with non-square patches, dynamic_img_pad or dynamic_img_size")
        has_norm = not self.is_id(pe.norm)
        if has_norm:
            self.norm(pe.norm, "patch_embed.norm")
        return {
            "img_size": [int(h), int(w)] if h != w else int(h),
            "patch_size": [int(ps[0]), int(ps[1])] if ps[0] != ps[1] else int(ps[0]),
            "in_chans": conv.in_channels,
            # timm's conv leaves out the pixels past the last whole patch: an explicit stride crops the same
            "patch_embed": {"name": "conv", "params": {"bias": conv.bias is not None, "norm": has_norm, "pad": pad,
                                                       **({"stride": int(ps[0])} if crops else {})}},
        }

    def pool_include_prefix(self) -> bool:
        """Whether the pool sees the prefix tokens too."""
        return bool(getattr(self.m, "pool_include_prefix", False))

    def pool(self, heads: int, hidden: int) -> tuple[dict, bool]:
        """The pool selection and whether timm's fc_norm becomes vitlab's final norm."""
        m = self.m
        gp = m.global_pool
        fc_norm = not self.is_id(m.fc_norm)
        include_prefix = self.pool_include_prefix()
        if gp == "map":
            from timm.layers import AttentionPoolLatent, Mlp

            ap = m.attn_pool
            if type(ap) is not AttentionPoolLatent:
                raise self.unsupported(f"attention pool {type(ap).__name__}")
            if fc_norm:
                raise self.unsupported("fc_norm after map pooling")
            if ap.pos_embed is not None:
                raise self.unsupported("position embedding inside the attention pool")
            D = m.embed_dim
            if ap.latent_dim != D or ap.mlp is None or ap.out_features != D:
                raise self.unsupported("attention pool with a different width or without its MLP")
            if ap.pool not in ("token", "avg"):
                raise self.unsupported(f"attention pool reduction '{ap.pool}'")
            kv = self.linear(ap.kv, "attn_pool.kv")
            q_proj = not self.is_id(ap.q)
            if q_proj and (self.linear(ap.q, "attn_pool.q").bias is not None) != (kv.bias is not None):
                raise self.unsupported("attention pool with bias on only one of q / kv")
            self.linear(ap.proj, "attn_pool.proj")
            if self.is_id(ap.norm):
                raise self.unsupported("attention pool without its norm")
            self.norm(ap.norm, "attn_pool.norm")
            qk_norm = not self.is_id(ap.q_norm)
            if qk_norm:
                self.norm(ap.q_norm, "attn_pool.q_norm")
                self.norm(ap.k_norm, "attn_pool.k_norm")
            if type(ap.mlp) is not Mlp or not self.is_id(ap.mlp.norm):
                raise self.unsupported("attention pool MLP other than fc1 -> act -> fc2")
            mlp_hidden = self.linear(ap.mlp.fc1, "attn_pool.mlp.fc1").out_features
            pool_act = self.act(ap.mlp.act, "attn_pool.mlp.act")
            params = {
                "num_heads": None if ap.num_heads == heads else ap.num_heads,
                "mlp_ratio": None if mlp_hidden == hidden else self.mlp_ratio(mlp_hidden, "attn_pool.mlp"),
                "latent_len": ap.latent_len, "reduce": ap.pool, "qkv_bias": kv.bias is not None,
                "qk_norm": qk_norm, "q_proj": q_proj, "act": pool_act, "include_prefix": include_prefix,
            }
            return {"name": "map", "params": params}, False
        if m.attn_pool is not None:
            raise self.unsupported(f"attention pool {type(m.attn_pool).__name__} (global_pool='{gp}')")
        if gp == "avg":
            if include_prefix:
                raise self.unsupported("average pooling over prefix tokens (pool_include_prefix)")
            if fc_norm:
                self.norm(m.fc_norm, "fc_norm")
            return {"name": "avg", "params": {"norm": fc_norm}}, False
        if gp in ("token", ""):
            # a per-token norm commutes with taking tokens: fc_norm here is a final norm
            if fc_norm:
                self.norm(m.fc_norm, "fc_norm")
            return {"name": "token" if gp == "token" else "none"}, fc_norm
        raise self.unsupported(f"global_pool '{gp}'")

    def num_classes(self, width: int) -> int:
        """Classes of the model's ``head`` (0 when it has none); refused unless one Linear with bias."""
        m = self.m
        if self.is_id(m.head):
            return 0
        head = self.linear(m.head, "head")
        if head.bias is None or head.in_features != width:
            raise self.unsupported("classifier head without bias or of another width")
        return head.out_features

    def head_and_blocks(self, data: dict[str, Any]) -> list[dict]:
        """``num_classes``, the sizes and every block (all read alike) of a single-width model."""
        m = self.m
        D = m.embed_dim
        data["num_classes"] = self.num_classes(D)
        if not len(m.blocks):
            raise self.unsupported("model without blocks")
        blocks = [self.block(b, i) for i, b in enumerate(m.blocks)]
        strip = lambda b: {k: v for k, v in b.items() if k != "drop_path"}  # noqa: E731
        for i, b in enumerate(blocks[1:], start=1):
            if strip(b) != strip(blocks[0]):
                raise self.unsupported(f"blocks that differ (block {i} is not configured like block 0)")
        heads, hidden = blocks[0]["attn"]["heads"], blocks[0]["mlp"]["hidden"]
        data.update(embed_dim=D, depth=len(blocks), num_heads=heads, mlp_ratio=self.mlp_ratio(hidden, "blocks.0.mlp"))
        return blocks

    def final_norm_and_pool(self, data: dict[str, Any]) -> None:
        """The final norm and pool of a model with only ``''`` / ``avg`` / ``token`` pooling, a
        ``norm`` before and an ``fc_norm`` after it, and no ``norm_pre`` (BEiT, relpos) into ``data``."""
        m = self.m
        data["pre_norm"] = False
        final, fc_norm = not self.is_id(m.norm), not self.is_id(m.fc_norm)
        if final:
            self.norm(m.norm, "norm")
        if fc_norm:
            self.norm(m.fc_norm, "fc_norm")
        gp = m.global_pool
        if gp == "avg":  # over the patches only, then fc_norm
            data["pool"] = {"name": "avg", "params": {"norm": fc_norm}}
            data["final_norm"] = final
        elif gp in ("token", ""):
            if final and fc_norm:
                raise self.unsupported("both a final norm and fc_norm after token pooling")
            # a per-token norm commutes with taking tokens: fc_norm here is a final norm
            data["pool"] = {"name": "token" if gp == "token" else "none"}
            data["final_norm"] = final or fc_norm
        else:
            raise self.unsupported(f"global_pool '{gp}'")

    def norm_selection(self) -> dict:
        """The one norm every norm layer read so far is (vitlab uses one norm everywhere)."""
        kinds = set(self.norms.values())
        if len(kinds) != 1:
            where: dict[tuple, list[str]] = {}
            for w, cfg in self.norms.items():
                where.setdefault(cfg, []).append(w)
            listing = "; ".join(
                f"{n}({', '.join(f'{k}={v}' for k, v in p)}) at {', '.join(ws[:3])}"
                + (f" and {len(ws) - 3} more" if len(ws) > 3 else "")
                for (n, p), ws in where.items()
            )
            raise self.unsupported(f"mix of norm layers (vitlab uses one norm everywhere): {listing}")
        norm_name, norm_params = kinds.pop()
        return {"name": norm_name, "params": dict(norm_params)}

    # --- the whole model ----------------------------------------------------------------------

    def spec(self) -> ViTSpec:
        from timm.models.vision_transformer import VisionTransformer

        m = self.m
        if not isinstance(m, VisionTransformer):
            raise SpecError(f"cannot convert {self.label}: {type(m).__name__} is not a timm VisionTransformer "
                            "(or PoolingVisionTransformer)")
        from timm.models.deit import VisionTransformerDistilled

        distilled = type(m) is VisionTransformerDistilled
        if type(m) is not VisionTransformer and not distilled:
            raise self.unsupported(f"VisionTransformer subclass {type(m).__name__}")
        D = m.embed_dim
        data: dict[str, Any] = {"name": self.name, **self.patch_embed()}
        data["num_classes"] = self.num_classes(D)
        if not self.is_id(getattr(m, "patch_drop", None)):
            raise self.unsupported("patch dropout (patch_drop_rate)")

        if not len(m.blocks):
            raise self.unsupported("model without blocks")
        blocks = [self.block(b, i) for i, b in enumerate(m.blocks)]
        first = blocks[0]
        for i, b in enumerate(blocks[1:], start=1):
            if {k: v for k, v in b.items() if k != "drop_path"} != {k: v for k, v in first.items() if k != "drop_path"}:
                raise self.unsupported(f"blocks that differ (block {i} is not configured like block 0)")
        heads = first["attn"]["heads"]
        hidden = first["mlp"]["hidden"]
        data.update(embed_dim=D, depth=len(blocks), num_heads=heads, mlp_ratio=self.mlp_ratio(hidden, "blocks.0.mlp"))

        data["class_token"] = m.cls_token is not None
        data["reg_tokens"] = int(getattr(m, "num_reg_tokens", 0) or 0)
        if distilled:  # the distillation token is the first register token (``families.DEIT_DISTILLED``)
            if data["reg_tokens"] or m.no_embed_class:
                raise self.unsupported("distillation token with register tokens or no_embed_class")
            if m.distilled_training:
                raise self.unsupported("distilled training mode (separate class and distillation logits)")
            data["reg_tokens"] = 1
        prefix = int(data["class_token"]) + data["reg_tokens"]
        if data["class_token"] != bool(m.has_class_token or distilled) or m.num_prefix_tokens != prefix:
            raise self.unsupported("prefix tokens other than one class token and register tokens")
        grid = m.patch_embed.grid_size
        if m.pos_embed is None:
            data["pos_embed"] = {"name": "none"}
        else:
            include_prefix = not m.no_embed_class
            expected = grid[0] * grid[1] + (m.num_prefix_tokens if include_prefix else 0)
            if tuple(m.pos_embed.shape) != (1, expected, D):
                raise self.unsupported(f"position embedding of shape {tuple(m.pos_embed.shape)}")
            data["pos_embed"] = {"name": "learned", "params": {"include_prefix": include_prefix}}

        pool, final, fc_as_final = self.norms_and_pool(data, heads, hidden)
        if distilled:
            if pool["name"] != "token" or fc_as_final:
                raise self.unsupported("distilled head after another pooling or fc_norm")
            pool = {"name": "distilled", "params": {"norm": False}}
            dist_head = m.head_dist
            if self.is_id(dist_head) != self.is_id(m.head) or (
                    not self.is_id(dist_head) and (self.linear(dist_head, "head_dist").bias is None
                                                   or dist_head.weight.shape != m.head.weight.shape)):
                raise self.unsupported("distillation head head_dist unlike the class head")
        data["final_norm"] = final or fc_as_final
        data["pool"] = pool
        data["dynamic_img_size"] = bool(m.dynamic_img_size)

        return self.finish(data, blocks)

    def norms_and_pool(self, data: dict[str, Any], heads: int, hidden: int) -> tuple[dict, bool, bool]:
        """``norm_pre`` and the final norm into ``data`` (read as the recipe's norm), and the pool:
        ``(pool selection, final norm present, fc_norm read as the final norm)``."""
        m = self.m
        data["pre_norm"] = not self.is_id(m.norm_pre)
        if data["pre_norm"]:
            self.norm(m.norm_pre, "norm_pre")
        final = not self.is_id(m.norm)
        if final:
            self.norm(m.norm, "norm")
        pool, fc_as_final = self.pool(heads, hidden)
        return pool, final, fc_as_final

    def finish(self, data: dict[str, Any], blocks: list[dict]) -> ViTSpec:
        """The block selections (all blocks read alike), the one norm, the rates, validated."""
        first, m = blocks[0], self.m
        data["attention"] = {"name": first["attn"].get("name", "mhsa"),
                             "params": {**first["attn"]["params"], **data.pop("attention_extra", {})}}
        data["mlp"] = {"name": first["mlp"]["name"], "params": first["mlp"]["params"]}
        data["block"] = first["block"]
        data["norm"] = self.norm_selection()
        data["drop_rate"] = _fmt_float(m.head_drop.p)
        data["pos_drop_rate"] = _fmt_float(m.pos_drop.p) if hasattr(m, "pos_drop") else 0.0  # relpos has none
        data["proj_drop_rate"] = _fmt_float(first["attn"]["proj_drop"])
        data["drop_path_rate"] = _fmt_float(blocks[-1]["drop_path"]) if len(blocks) > 1 else 0.0

        from ..recipes import load_spec

        return load_spec(data)


# timm model class -> the reader of its family: (timm module, class, module here, reader class).
# First match wins, so a subclass is listed before its base; anything else is read as timm's
# ``VisionTransformer`` by ``_Reader`` (which refuses what it is not).
READERS: tuple[tuple[str, str, str, str], ...] = (
    ("timm.models.qwen3_vit", "Qwen3VitClassifier", ".qwen3", "QwenReader"),
    ("timm.models.qwen3_vit", "Qwen3VitEncoder", ".qwen3", "QwenReader"),
    ("timm.models.deepseek_vit", "DeepseekVitClassifier", ".deepseek", "DeepseekReader"),
    ("timm.models.deepseek_vit", "DeepseekVitEncoder", ".deepseek", "DeepseekReader"),
    ("timm.models.gemma4_vit", "Gemma4VitClassifier", ".gemma4", "GemmaReader"),
    ("timm.models.gemma4_vit", "Gemma4VitEncoder", ".gemma4", "GemmaReader"),
    ("timm.models.naflexvit", "NaFlexVit", ".naflex", "NaFlexReader"),
    ("timm.models.vision_transformer_sam", "VisionTransformerSAM", ".sam", "SamReader"),
    ("timm.models.convit", "ConVit", ".convit", "ConVitReader"),
    ("timm.models.cait", "Cait", ".cait", "CaitReader"),
    ("timm.models.xcit", "Xcit", ".xcit", "XcitReader"),
    ("timm.models.pit", "PoolingVisionTransformer", ".pit", "PitReader"),
    ("timm.models.beit", "Beit", ".beit", "BeitReader"),
    ("timm.models.vision_transformer_relpos", "VisionTransformerRelPos", ".relpos", "RelPosReader"),
    ("timm.models.eva", "Eva", ".eva", "EvaReader"),
)


def spec_from_timm(model_or_name: nn.Module | str, **create_kwargs: Any) -> ViTSpec:
    """The ``ViTSpec`` of a timm ``VisionTransformer``, or of a ``PoolingVisionTransformer`` (PiT:
    a spec with ``stages``; see ``vitlab.timm_interop.pit``).

    Args:
        model_or_name: a timm ``VisionTransformer`` / ``PoolingVisionTransformer`` instance, or a
            timm model name (created with ``pretrained=False`` on the meta device: no weights are
            downloaded or allocated).
        create_kwargs: extra ``timm.create_model`` arguments when a name is given (``depth=2``).

    Raises:
        SpecError: the model is neither of those, or uses a feature vitlab cannot express (the
            message names it).
    """
    if isinstance(model_or_name, str):
        model = create_timm_model(model_or_name, **create_kwargs)
        name = model_or_name
        label = f"timm model '{name}'"
    else:
        if create_kwargs:
            raise TypeError("create_kwargs are only for a model name")
        model = model_or_name
        cfg = getattr(model, "pretrained_cfg", None) or {}
        name = cfg.get("architecture")
        label = f"timm model '{name}'" if name else f"timm {type(model).__name__}"
        name = name or f"timm_{type(model).__name__.lower()}"
    import importlib

    for timm_module, timm_cls, module, reader in READERS:
        if isinstance(model, getattr(importlib.import_module(timm_module), timm_cls)):
            cls = getattr(importlib.import_module(module, __package__), reader)
            return cls(model, name, label).spec()
    return _Reader(model, name, label).spec()
