"""The reading half of a timm family: ``Reader`` reads the modules timm's layers share (norms,
activations, ``Attention``, ``Mlp``, ``Block``, ``PatchEmbed``, the attention pool) into the
selections of a ``ViTSpec``; each family's reader (``families``) subclasses it for its own modules.
A reader reads what the instance is (its modules, attributes and parameter shapes), never its name.

Every feature vitlab cannot express raises ``Unsupported`` naming that feature, so a converted spec
is always the same function as the timm model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from torch import nn

from ..errors import Problem, SpecError
from ..layout import format_indices
from ..spec import ViTSpec
from .equivalents import read_twin, twin_of


def common_and_layers(values: list[Any], key: str, at=None) -> tuple[Any, list[dict]]:
    """Each block's value of ``key`` -> the recipe's (the most common; the earliest on a tie) and
    ``layers`` overrides for the other blocks, one entry per other value, its blocks written by
    ``at`` (default ``format_indices``: ``"2,5,8,11"``)."""
    at = at or format_indices
    reprs = [repr(v) for v in values]
    common = max(reprs, key=lambda r: (reprs.count(r), -reprs.index(r)))
    others: dict[str, list[int]] = {}
    for i, r in enumerate(reprs):
        if r != common:
            others.setdefault(r, []).append(i)
    return values[reprs.index(common)], [{"at": at(idx), key: values[idx[0]]} for idx in others.values()]


class Unsupported(SpecError):
    """A timm model feature with no vitlab equivalent (the message names it)."""


def fmt_float(x: float) -> float:
    """Drop float32 noise (0.10000000149 -> 0.1) from rates read back from modules."""
    return float(f"{float(x):.7g}")


@dataclass(frozen=True)
class BlockRead:
    """One block as read: its attention selection (with ``heads`` and ``proj_drop``, which the spec
    keeps elsewhere), its MLP selection (with ``hidden`` and ``drop``), its block selection, and its
    stochastic-depth rate."""

    attn: dict[str, Any]
    mlp: dict[str, Any]
    block: dict[str, Any]
    drop_path: float = 0.0

    def settings(self, attn: Iterable[str] = (), mlp: Iterable[str] = ()) -> tuple:
        """What must match between blocks read alike: all but the stochastic-depth rate and the
        ``attn`` / ``mlp`` entries named."""
        return ({k: v for k, v in self.attn.items() if k not in attn},
                {k: v for k, v in self.mlp.items() if k not in mlp}, self.block)


class Reader:
    """Reads one timm model instance; ``registry`` is where plugin twins are looked up."""

    def __init__(self, model: nn.Module, name: str, label: str, registry):
        self.m = model
        self.name = name
        self.label = label  # "timm model 'vit_x'" or "timm VisionTransformer"
        self.registry = registry
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
        eq = twin_of(self.registry, kind, module)
        if eq is None:
            return None
        try:
            params = read_twin(eq, module)
        except Exception as exc:  # noqa: BLE001 - a plugin's refusal, or its bug: either way not this model
            raise self.unsupported(f"{type(module).__name__} at {where} ({kind} '{eq.name}' of plugin "
                                   f"'{eq.provider}': {exc})") from None
        return {"name": eq.name, "params": params}

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
                "attn_drop": fmt_float(a.attn_drop.p)}

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
                  "attn_drop": fmt_float(a.attn_drop.p)}
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
        return fmt_float(init)

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        """Block ``i`` of width ``dim`` (default: the model's embed_dim), named ``where`` in messages:
        a plugin twin's block around timm's parts, timm's ``Block`` or ``ResPostBlock``."""
        from timm.models.vision_transformer import Block, ResPostBlock

        where = where or f"blocks.{i}"
        t = type(b)
        D = dim or self.m.embed_dim
        if (sel := self.equivalent("block", b, where)) is not None:  # a plugin's block around timm's parts
            for n in ("norm1", "norm2"):
                if hasattr(b, n):
                    self.norm(getattr(b, n), f"{where}.{n}")
            return BlockRead(self.attention(b.attn, f"{where}.attn", D), self.mlp(b.mlp, f"{where}.mlp", D), sel,
                             float(getattr(getattr(b, "drop_path1", None), "drop_prob", 0.0)))
        if t in (Block, ResPostBlock):
            read = self.two_branch(b, where, post=t is ResPostBlock, dim=D)
            if read.attn["name"] == "mhsa_diff":
                self.differential(b.attn, f"{where}.attn", i)
            return read
        raise self.unsupported(f"block type {t.__module__}.{t.__name__} at {where}")

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

    def two_branch(self, b: nn.Module, where: str, post: bool, dim: int | None = None) -> BlockRead:
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
        return BlockRead(attn, mlp, block, float(getattr(b.drop_path1, "drop_prob", 0.0)))

    def patch_embed(self) -> dict:
        from timm.layers import PatchEmbed

        pe = self.m.patch_embed
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
        for i, b in enumerate(blocks[1:], start=1):
            if b.settings() != blocks[0].settings():
                raise self.unsupported(f"blocks that differ (block {i} is not configured like block 0)")
        heads, hidden = blocks[0].attn["heads"], blocks[0].mlp["hidden"]
        data.update(embed_dim=D, depth=len(blocks), num_heads=heads, mlp_ratio=self.mlp_ratio(hidden, "blocks.0.mlp"))
        return blocks

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
        data["attention"] = {"name": first.attn.get("name", "mhsa"),
                             "params": {**first.attn["params"], **data.pop("attention_extra", {})}}
        data["mlp"] = {"name": first.mlp["name"], "params": first.mlp["params"]}
        data["block"] = first.block
        data["norm"] = self.norm_selection()
        data["drop_rate"] = fmt_float(m.head_drop.p)
        data["pos_drop_rate"] = fmt_float(m.pos_drop.p) if hasattr(m, "pos_drop") else 0.0  # relpos has none
        data["proj_drop_rate"] = fmt_float(first.attn["proj_drop"])
        data["drop_path_rate"] = fmt_float(blocks[-1].drop_path) if len(blocks) > 1 else 0.0
        return self.validated(data)

    def validated(self, data: dict[str, Any]) -> ViTSpec:
        """The spec of ``data``, validated against the reader's registry."""
        from ..recipes import load_spec

        return load_spec(data, registry=self.registry)
