"""timm's ``VisionTransformerSAM`` (``vision_transformer_sam``: Segment Anything's image encoder and
``samvit_base_patch16_224``) <-> ``ViTSpec``.

SAM is a ViT without prefix tokens whose blocks attend in windows (``window``, padded as SAM)
except at ``global_attn_indexes`` (``mhsa``, written as ``layers`` overrides), each with a
decomposed relative position (``window_decomposed`` / ``mhsa_decomposed``), a learned position
table over the patch grid, and no final norm: the neck (``sam_neck``) and an average pool feed the
classifier. The state-dict differences are the ``SAM`` family table: the neck and the
classifier live under the pool and head, and the position table is an image (1, gh, gw, D).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...components.window import WindowAttention
from ...sizes import as_pair
from ...spec import ViTSpec
from ..bridge import ImagePosFamily
from ..export import norm_layer, refuser
from ..reader import BlockRead, Reader, common_and_layers, fmt_float
from ..family import Exporting, TimmFamily

# timm's VisionTransformerSAM: the neck is the ``sam_neck`` pool's, the classifier ``head.fc``
# vitlab's ``head``, the decomposed tables keep timm's names (``attn.rel_pos_h`` / ``rel_pos_w``)
SAM = ImagePosFamily(
    "sam", marker=r"(neck\.|blocks\.\d+\.attn\.rel_pos_[hw]$)",
    renames=(("neck.{rest}", "pool.neck.{rest}"), ("head.fc.{rest}", "head.{rest}")),
)

# --- timm -> spec -----------------------------------------------------------------------------------


class SamReader(Reader):
    """Reads a timm ``VisionTransformerSAM`` instance (its modules and shapes, never its name)."""

    def attention(self, a: nn.Module, where: str, dim: int | None = None) -> dict:
        from timm.models.vision_transformer_sam import Attention as SamAttention

        if type(a) is not SamAttention:
            raise self.unsupported(f"attention layer {type(a).__name__} at {where}")
        if a.rope is not None:
            raise self.unsupported(f"rotary position embedding in SAM attention (use_rope) at {where}")
        params = self.qkv_attention(a, where)
        return {"heads": a.num_heads, "params": params, "proj_drop": a.proj_drop.p,
                "name": "mhsa_decomposed" if a.use_rel_pos else "mhsa"}

    def block(self, b: nn.Module, i: int, dim: int | None = None, where: str | None = None) -> BlockRead:
        """A SAM block: pre-norm, attending in windows of ``window_size`` or (0) globally."""
        from timm.models.vision_transformer_sam import Block as SamBlock

        where = where or f"blocks.{i}"
        if type(b) is not SamBlock:
            raise self.unsupported(f"block type {type(b).__module__}.{type(b).__name__} at {where}")
        read = self.two_branch(b, where, post=False)
        attn, w = read.attn, int(b.window_size)
        side = (w, w) if w else tuple(self.m.patch_embed.grid_size)
        if attn["name"] == "mhsa_decomposed":
            hd = self.m.embed_dim // attn["heads"]
            shapes = (tuple(b.attn.rel_pos_h.shape), tuple(b.attn.rel_pos_w.shape))
            if shapes != ((2 * side[0] - 1, hd), (2 * side[1] - 1, hd)):
                raise self.unsupported(f"relative position tables of shapes {shapes} for a {side[0]}x{side[1]} "
                                       f"{'window' if w else 'grid'} at {where}.attn")
        if w:
            attn["name"] = "window_decomposed" if attn["name"] == "mhsa_decomposed" else "window"
            attn["params"]["window_size"] = w
        return read

    def head(self) -> dict:
        """The neck and classifier: ``{"pool": ..., "num_classes": ..., "drop_rate": ...}``."""
        from timm.layers import ClassifierHead, LayerNorm2d

        m = self.m
        if type(m.head) is not ClassifierHead:
            raise self.unsupported(f"head {type(m.head).__name__} (head_hidden_size: a hidden layer before the "
                                   "classifier)")
        head, neck = m.head, m.neck
        if head.use_conv or head.input_fmt != "NCHW" or getattr(head.global_pool, "pool_type", None) != "avg":
            raise self.unsupported(f"global_pool '{m.global_pool}' (vitlab's SAM neck averages)")
        parts = [neck] if type(neck) is LayerNorm2d else list(neck) if type(neck) is nn.Sequential else []
        convs = [c for c in parts if type(c) is nn.Conv2d]
        norms = [n for n in parts if type(n) is LayerNorm2d]
        D = m.embed_dim
        if type(neck) is LayerNorm2d:  # neck_chans=None: one norm over the tokens' width
            channels = None
            if tuple(neck.normalized_shape) != (D,):
                raise self.unsupported("neck LayerNorm of another width than embed_dim")
        elif [type(x) for x in parts] == [nn.Conv2d, LayerNorm2d, nn.Conv2d, LayerNorm2d]:
            channels = convs[0].out_channels
            want = [(D, channels, (1, 1), (0, 0)), (channels, channels, (3, 3), (1, 1))]
            got = [(c.in_channels, c.out_channels, tuple(c.kernel_size), tuple(c.padding)) for c in convs]
            if got != want or [tuple(n.normalized_shape) for n in norms] != [(channels,)] * 2 or any(
                    c.bias is not None or tuple(c.stride) != (1, 1) or c.groups != 1 or tuple(c.dilation) != (1, 1)
                    or c.padding_mode != "zeros" for c in convs):
                raise self.unsupported("neck other than conv 1x1 -> LayerNorm2d -> conv 3x3 -> LayerNorm2d without "
                                       "biases")
        else:
            raise self.unsupported(f"neck {type(neck).__name__}")
        if any(not n.elementwise_affine or n.bias is None for n in norms) or len({n.eps for n in norms}) != 1:
            raise self.unsupported("neck LayerNorms without affine weights or of different eps")
        width = channels or D
        num_classes = 0
        if not self.is_id(head.fc):
            fc = self.linear(head.fc, "head.fc")
            if fc.bias is None or fc.in_features != width:
                raise self.unsupported("classifier head without bias or of another width")
            num_classes = fc.out_features
        return {"pool": {"name": "sam_neck", "params": {"channels": channels, "eps": float(norms[0].eps)}},
                "num_classes": num_classes, "drop_rate": fmt_float(head.drop.p)}

    def spec(self) -> ViTSpec:
        from timm.models.vision_transformer_sam import VisionTransformerSAM

        m = self.m
        if type(m) is not VisionTransformerSAM:
            raise self.unsupported(f"VisionTransformerSAM subclass {type(m).__name__}")
        data: dict[str, Any] = {"name": self.name, **self.patch_embed(), "class_token": False, "reg_tokens": 0}
        if not self.is_id(m.patch_drop):
            raise self.unsupported("patch dropout (patch_drop_rate)")
        if m.rope_global is not None or m.rope_window is not None:
            raise self.unsupported("rotary position embedding in SAM attention (use_rope)")
        D, grid = m.embed_dim, tuple(m.patch_embed.grid_size)
        if m.pos_embed is None:
            data["pos_embed"] = {"name": "none"}
        elif tuple(m.pos_embed.shape) == (1, *grid, D):
            data["pos_embed"] = {"name": "learned"}
        else:
            raise self.unsupported(f"position embedding of shape {tuple(m.pos_embed.shape)}")
        data["pre_norm"] = not self.is_id(m.norm_pre)
        if data["pre_norm"]:
            self.norm(m.norm_pre, "norm_pre")
        data["final_norm"] = False  # the neck's norms are the pool's

        if not len(m.blocks):
            raise self.unsupported("model without blocks")
        blocks = [self.block(b, i) for i, b in enumerate(m.blocks)]
        attns = [{"name": b.attn["name"], "params": b.attn["params"]} for b in blocks]
        for i, b in enumerate(blocks[1:], start=1):
            if b.settings(attn=("name", "params")) != blocks[0].settings(attn=("name", "params")):
                raise self.unsupported(f"blocks that differ other than in attention (block {i} is not configured "
                                       "like block 0)")
        data["attention"], data["layers"] = common_and_layers(attns, "attention")

        first = blocks[0]
        heads = first.attn["heads"]
        data.update(embed_dim=D, depth=len(blocks), num_heads=heads,
                    mlp_ratio=self.mlp_ratio(first.mlp["hidden"], "blocks.0.mlp"),
                    mlp={"name": first.mlp["name"], "params": first.mlp["params"]}, block=first.block)
        data.update(self.head())
        data["norm"] = self.norm_selection()
        data["pos_drop_rate"] = fmt_float(m.pos_drop.p)
        data["proj_drop_rate"] = fmt_float(first.attn["proj_drop"])
        data["drop_path_rate"] = fmt_float(blocks[-1].drop_path) if len(blocks) > 1 else 0.0
        data["dynamic_img_size"] = False  # the neck reads the patch grid of the model's one image size

        return self.validated(data)


# --- spec -> timm -----------------------------------------------------------------------------------

_GLOBAL = {"mhsa": False, "mhsa_decomposed": True}  # attention -> with decomposed relative position
_WINDOW = {"window": False, "window_decomposed": True}
# the params Swin gave ``window`` (shift, bias, cosine), at the values that leave a window SAM's
_SWIN_ONLY = {k: v for k, v in WindowAttention.Params().model_dump(mode="json").items()
              if k in ("shift", "rel_pos", "cosine", "pretrained_window_size", "cpb_hidden", "cpb_drop")}


def _claims(spec: ViTSpec) -> bool:
    return spec.pool.name == "sam_neck" or any(
        p.selections["attention"].name in ("mhsa_decomposed", "window_decomposed") for p in spec.block_plans())


def sam_kwargs(spec: ViTSpec, ex: Exporting) -> dict[str, Any]:
    """Keyword arguments of timm's ``VisionTransformerSAM`` (any ``samvit_*`` name) for ``spec``."""
    from timm.layers import get_act_layer


    fail = refuser(spec, "VisionTransformerSAM")
    if spec.stages is not None or spec.class_token or spec.reg_tokens:
        raise fail("stages or prefix tokens (SAM has neither)")
    if spec.pool.name != "sam_neck" or spec.pool.params["eps"] != 1e-6:
        raise fail(f"pool '{spec.pool.name}' {spec.pool.params} (SAM: sam_neck with eps 1e-6, timm's LayerNorm2d)")
    if spec.final_norm:
        raise fail("a final norm before the neck")
    pe, pos = spec.patch_embed, spec.pos_embed
    if pe.name != "conv" or pe.params.get("norm") or pe.params.get("pad") or pe.params.get("stride") not in (
            None, *spec.patch_hw):
        raise fail(f"patch embedding '{pe.name}' {pe.params} (SAM: a plain conv)")
    if pe.params.get("bias", True) == spec.pre_norm:
        raise fail("patch-embedding bias together with pre_norm, or neither (timm: a bias exactly without pre_norm)")
    if pos.name not in ("learned", "none"):
        raise fail(f"position encoding '{pos.name}'")
    mlp, block = spec.mlp, spec.block
    if mlp.name != "mlp" or mlp.params.get("norm") or not mlp.params.get("bias", True):
        raise fail(f"mlp '{mlp.name}' {mlp.params} (SAM: timm's Mlp with biases)")
    if block.name != "prenorm":
        raise fail(f"block '{block.name}'")
    if spec.norm.name not in ("layernorm", "rmsnorm"):
        raise fail(f"norm '{spec.norm.name}'")

    windows, global_blocks, rel_pos, attn_params = set(), [], set(), set()
    for plan in spec.block_plans():
        sel = plan.selections["attention"]
        others = {k: v for k, v in plan.selections.items() if k != "attention"}
        if others != {k: spec.selection(k) for k in others} or plan.mlp_ratio != spec.mlp_ratio:
            raise fail(f"per-block overrides other than attention (block {plan.index})")
        params = dict(sel.params)
        if sel.name in _GLOBAL:
            global_blocks.append(plan.index)
            rel_pos.add(_GLOBAL[sel.name])
        elif sel.name in _WINDOW:
            windows.add(params.pop("window_size"))
            rel_pos.add(_WINDOW[sel.name])
            # Swin's window params: SAM's windows are never shifted, carry no bias table and no cosine
            swin = {k: params.pop(k) for k in _SWIN_ONLY if k in params}
            if any(as_pair(v) != as_pair(_SWIN_ONLY[k]) if k == "shift" else v != _SWIN_ONLY[k]
                   for k, v in swin.items()):
                raise fail(f"shifted windows, a window bias or cosine attention at block {plan.index} "
                           "(Swin's, not SAM's)")
        else:
            raise fail(f"attention '{sel.name}' at block {plan.index}")
        if params.get("kv_heads") not in (None, spec.num_heads) or not params["proj_bias"]:
            raise fail(f"attention with kv_heads or without output bias at block {plan.index}")
        attn_params.add(tuple(sorted((k, v) for k, v in params.items() if k not in ("kv_heads", "proj_bias"))))
    if len(windows) > 1 or len(rel_pos) > 1 or len(attn_params) > 1:
        raise fail("attention that differs between blocks other than windowed or global, with one window size "
                   "and relative position in all blocks or none")
    ap = dict(attn_params.pop())
    return dict(
        img_size=spec.img_size if isinstance(spec.img_size, int) else tuple(spec.img_size),
        patch_size=spec.patch_size if isinstance(spec.patch_size, int) else tuple(spec.patch_size),
        in_chans=spec.in_chans, num_classes=spec.num_classes, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=ap["qkv_bias"], qk_norm=ap["qk_norm"],
        init_values=block.params.get("init_values"), pre_norm=spec.pre_norm, drop_rate=spec.drop_rate,
        pos_drop_rate=spec.pos_drop_rate, patch_drop_rate=0.0, proj_drop_rate=spec.proj_drop_rate,
        attn_drop_rate=ap.get("attn_drop", 0.0), drop_path_rate=spec.drop_path_rate,
        norm_layer=norm_layer(spec, fail), act_layer=get_act_layer(mlp.params["act"]),
        use_abs_pos=pos.name == "learned", use_rel_pos=rel_pos.pop(), use_rope=False,
        window_size=windows.pop() if windows else 0, global_attn_indexes=tuple(global_blocks),
        neck_chans=spec.pool.params["channels"], global_pool="avg", head_hidden_size=None,
    )


def sam_state_dict(model, ex: Exporting) -> dict[str, torch.Tensor]:
    """A vitlab SAM's weights in timm's names (``SAM`` read backwards)."""
    sam_kwargs(model.spec, ex)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if "pos_embed.weight" in sd:
        sd["pos_embed"] = sd.pop("pos_embed.weight")
    return SAM.restore(sd, grid=tuple(model.grid_size))


FAMILY = TimmFamily(
    "vision_transformer_sam", classes=("timm.models.vision_transformer_sam.VisionTransformerSAM",), reader=SamReader,
    claims=_claims,
    timm_class="timm.models.vision_transformer_sam.VisionTransformerSAM",
    kwargs=sam_kwargs, state_dict=sam_state_dict, tables=(SAM,),
)
