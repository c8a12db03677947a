"""The Vision Transformer assembled from a spec's named components.

Parameter names follow timm's ``VisionTransformer`` where the structure matches (``patch_embed.proj``,
``cls_token``, ``reg_token``, ``norm_pre``, ``blocks.N.*``, ``norm``, ``head``); components own
their inner names (the learned position table is ``pos_embed.weight``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .component import BLOCK_KINDS
from .errors import PluginError
from .plugins import BUILTIN
from .registry import Registry
from .spec import ViTSpec
from .state import ForwardState, as_output


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
        self.registry = registry  # what built it: counting and converting read the same components

        plans = spec.block_plans()
        stage_plans = spec.stage_plans()

        def factory(kind: str, ctx, **kwargs: Any) -> nn.Module:
            # a block's parts follow its own selections (``layers``); a transition its stage's
            if ctx.block_index is not None and kind in BLOCK_KINDS:
                sel = plans[ctx.block_index].selections[kind]
            elif kind == "transition":
                sel = stage_plans[ctx.stage_index].transition
            else:
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

        contexts = [c.replace(_factory=factory) for c in
                    spec.stage_contexts(registry, device=device, dtype=dtype)]
        ctx, last = contexts[0], contexts[-1]
        self.ctx = ctx
        D, fk = ctx.embed_dim, ctx.factory_kwargs
        self.num_prefix_tokens = ctx.num_prefix_tokens
        self.grid_size = ctx.grid_size
        self.stage_grids = [c.grid_size for c in contexts]  # at the recipe's img_size

        self.patch_embed = ctx.make("patch_embed")
        self.cls_token = nn.Parameter(torch.empty(1, 1, D, **fk)) if spec.class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, spec.reg_tokens, D, **fk)) if spec.reg_tokens else None
        self.pos_embed = ctx.make("pos_embed")
        self.pos_drop = nn.Dropout(spec.pos_drop_rate)
        self.norm_pre = ctx.make("norm") if spec.pre_norm else nn.Identity()
        # stochastic depth grows linearly with depth, 0 for the first block
        rates = [spec.drop_path_rate * i / max(spec.depth - 1, 1) for i in range(spec.depth)]
        self.blocks = nn.ModuleList(
            contexts[p.stage].replace(block_index=p.index, drop_path=rates[p.index],
                                      mlp_hidden_dim=p.mlp_hidden_dim(contexts[p.stage].embed_dim)).make("block")
            for p in plans
        )
        # transitions.<stage> leads into that stage, before its first block
        self.transitions = nn.ModuleDict({
            str(p.index): spec.transition_context(contexts, p.index).make("transition") for p in stage_plans[1:]
        })
        self._transition_at = {p.start: str(p.index) for p in stage_plans[1:]}
        self.norm = last.make("norm") if spec.final_norm else nn.Identity()
        self.pool = last.make("pool")
        self.head_drop = nn.Dropout(spec.drop_rate)
        self.head = self.pool.make_head(last, spec.num_classes)
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

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
        """Images (B, C, H, W) -> tokens entering the first block (B, P + N, D) and their state."""
        B, _, H, W = images.shape
        grid = self.patch_grid(H, W)
        state = ForwardState.start(grid, self.num_prefix_tokens, positions=self.pos_embed)
        x = self.patch_embed(images)  # (B, N, D)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            x = torch.cat(prefix + [x], dim=1)  # (B, P + N, D), class token first
        x = self.pos_embed(x, state)
        return self.norm_pre(self.pos_drop(x)), state

    def run_block(self, index: int, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        """Block ``index`` (after the transition into its stage, if it starts one), then the
        position encoding's ``after_block``: (tokens, state) -> (tokens, state)."""
        stage = self._transition_at.get(index)
        if stage is not None:
            x, state = as_output(self.transitions[stage](x, state.replace(stage_index=int(stage), block_index=None)), state)
        state = state.replace(block_index=index)
        block = self.blocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(block, x, state, use_reentrant=False)
        else:
            out = block(x, state)
        x, state = as_output(out, state)
        return self.pos_embed.after_block(x, state), state

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
        """Images -> tokens after the final norm and the state they end in."""
        x, state = self.embed(images)
        for i in range(len(self.blocks)):
            x, state = self.run_block(i, x, state)
        return self.norm(x), state

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens after the final norm (B, P + N, D)."""
        return self.forward_tokens(images)[0]

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
