"""The Vision Transformer assembled from a spec's named components.

Parameter names follow timm's ``VisionTransformer`` where the structure matches (``patch_embed.proj``,
``cls_token``, ``reg_token``, ``norm_pre``, ``blocks.N.*``, ``norm``, ``head``); components own
their inner names (the learned position table is ``pos_embed.weight``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .errors import PluginError
from .layers import Linear
from .plugins import BUILTIN
from .registry import Registry
from .spec import ViTSpec


class VisionTransformer(nn.Module):
    """A ViT built from a validated ``ViTSpec``.

    Args:
        spec: the validated variant.
        registry: where component names are looked up (default: installed plugins).
        device, dtype: where parameters are allocated; ``device="meta"`` allocates nothing.
    """

    def __init__(self, spec: ViTSpec, *, registry: Registry | None = None, device=None, dtype=None):
        super().__init__()
        if registry is None:
            from .plugins import get_registry

            registry = get_registry()
        self.spec = spec

        def factory(kind: str, ctx, **kwargs: Any) -> nn.Module:
            sel = spec.selection(kind)
            info = registry.get(kind, sel.name)
            params = info.cls.Params.model_validate(sel.params)
            if info.provider == BUILTIN:
                return info.cls(ctx, params, **kwargs)
            try:  # foreign code: a failure names the plugin instead of surfacing as an internal error
                module = info.cls(ctx, params, **kwargs)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"{kind} '{sel.name}' from plugin '{info.provider}' failed to build: {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(module, nn.Module):
                raise PluginError(f"{kind} '{sel.name}' from plugin '{info.provider}' built {type(module).__name__}, not a module")
            return module

        ctx = spec.build_context(registry, device=device, dtype=dtype, _factory=factory)
        self.ctx = ctx
        D, fk = spec.embed_dim, ctx.factory_kwargs
        self.num_prefix_tokens = ctx.num_prefix_tokens
        self.grid_size = ctx.grid_size

        self.patch_embed = ctx.make("patch_embed")
        self.cls_token = nn.Parameter(torch.empty(1, 1, D, **fk)) if spec.class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, spec.reg_tokens, D, **fk)) if spec.reg_tokens else None
        self.pos_embed = ctx.make("pos_embed")
        self.pos_drop = nn.Dropout(spec.pos_drop_rate)
        self.norm_pre = ctx.make("norm") if spec.pre_norm else nn.Identity()
        # stochastic depth grows linearly with depth, 0 for the first block
        rates = [spec.drop_path_rate * i / max(spec.depth - 1, 1) for i in range(spec.depth)]
        self.blocks = nn.ModuleList(
            ctx.replace(block_index=i, drop_path=rates[i]).make("block") for i in range(spec.depth)
        )
        self.norm = ctx.make("norm") if spec.final_norm else nn.Identity()
        self.pool = ctx.make("pool")
        self.head_drop = nn.Dropout(spec.drop_rate)
        self.head = Linear(D, spec.num_classes, **fk) if spec.num_classes else nn.Identity()
        self.grad_checkpointing = False

        # class / register tokens start near zero (timm: normal, std 1e-6)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)

    # --- forward -----------------------------------------------------------------------------

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid for an input of this size (the spec's, or another when dynamic)."""
        if (height, width) == self.spec.img_hw:
            return self.grid_size
        if not self.spec.dynamic_img_size:
            h, w = self.spec.img_hw
            raise ValueError(
                f"input is {height}x{width} but the spec's img_size is {h}x{w}; "
                "set dynamic_img_size: true to accept other sizes"
            )
        embed = type(self.patch_embed)
        return tuple(embed.grid_size((height, width), self.spec.patch_hw, self.patch_embed.params))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens after the final norm (B, P + N, D)."""
        B, _, H, W = images.shape
        grid = self.patch_grid(H, W)
        x = self.patch_embed(images)  # (B, N, D)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            x = torch.cat(prefix + [x], dim=1)  # (B, P + N, D), class token first
        x = self.pos_embed(x, grid)
        x = self.norm_pre(self.pos_drop(x))
        qk_transform = self.pos_embed.qk_transform(grid)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, qk_transform, use_reentrant=False)
            else:
                x = block(x, qk_transform)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled features (``pre_logits``) or logits."""
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, classes), or pooled features when ``num_classes == 0``."""
        return self.forward_head(self.forward_features(images))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}"


def build_model(
    spec: ViTSpec | str | Mapping[str, Any],
    device=None,
    dtype=None,
    seed: int | None = None,
    *,
    registry: Registry | None = None,
) -> VisionTransformer:
    """Build the model of a spec (or recipe path / bundled name / mapping).

    Args:
        spec: a ``ViTSpec``, or anything ``load_spec`` accepts.
        device, dtype: allocation; ``"meta"`` builds without memory (parameter counts of 22B models).
        seed: makes initialisation deterministic without touching the global RNG state.
    """
    if not isinstance(spec, ViTSpec):
        from .recipes import load_spec

        spec = load_spec(spec, registry=registry)
    if seed is None:
        return VisionTransformer(spec, registry=registry, device=device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(spec, registry=registry, device=device, dtype=dtype)
