"""The Vision Transformer assembled from a spec's named components.

Parameter names follow timm's ``VisionTransformer`` where the structure matches (``patch_embed.proj``,
``cls_token``, ``reg_token``, ``norm_pre``, ``blocks.N.*``, ``norm``, ``head``); components own
their inner names (the learned position table is ``pos_embed.weight``).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .kinds import BLOCK_KINDS
from .errors import PluginError, SpecError
from .registry import BUILTIN, Registry
from .spec import ViTSpec
from .state import ForwardState, as_output
from .timm_api import TimmModelAPI

MIGRATION = "docs/migration.md"
# kinds whose forward receives the forward state: ``forward(x, state)`` since plugin API 2
_STATEFUL = ("pos_embed", "attention", "block", "transition")


def _takes_state(module: nn.Module) -> bool:
    """Whether ``module.forward`` accepts ``(x, state)`` (a 0.1 plugin's takes ``(x)``)."""
    try:
        inspect.signature(module.forward).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read: let the forward decide
        return True
    return True


def _old_api(exc: BaseException) -> bool:
    """An exception that says a component treated the forward state as something else (0.1's
    ``forward(x)``, a callable RoPE argument): ``'ForwardState' object is not callable`` and the like."""
    return isinstance(exc, (TypeError, AttributeError)) and "ForwardState" in str(exc)


class VisionTransformer(TimmModelAPI, nn.Module):
    """A ViT built from a validated ``ViTSpec``.

    Args:
        spec: the validated variant.
        registry: where component names are looked up (default: the one ``spec`` was validated against).
        device, dtype: where parameters are allocated; ``device="meta"`` allocates nothing.
    """

    def __init__(self, spec: ViTSpec, *, registry: Registry | None = None, device=None, dtype=None):
        super().__init__()
        registry = registry if registry is not None else spec.registry
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
            who = f"{kind} '{sel.name}' from plugin '{info.provider}'"
            if kind in _STATEFUL and not _takes_state(module):
                raise PluginError(f"{who} has forward{inspect.signature(module.forward)}, the vitlab 0.1 API; "
                                  f"since API 2 it is forward(x, state): see {MIGRATION}")
            foreign[id(module)] = who
            return module

        foreign: dict[int, str] = {}  # id of a plugin's module -> how messages name it

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
        self._stage_at = {p.start: str(p.index) for p in stage_plans[1:]}  # first block -> its stage
        self._foreign = foreign

        def named(kind: str, name: str) -> str:
            provider = registry.get(kind, name).provider
            return f"{kind} '{name}'" + ("" if provider == BUILTIN else f" from plugin '{provider}'")

        # how boundary errors name each block and transition
        self._block_names = [named("block", p.selections["block"].name) for p in plans]
        self._transition_names = {str(p.index): named("transition", p.transition.name) for p in stage_plans[1:]}
        self.norm = last.make("norm") if spec.final_norm else nn.Identity()
        self.pool = last.make("pool")
        self.head_drop = nn.Dropout(spec.drop_rate)
        self.head = self.pool.make_head(last, spec.num_classes)
        self.head_ctx = last  # what pool and head are built with (reset_classifier builds new ones)
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
        try:
            x = self.pos_embed(x, state)
        except (TypeError, AttributeError) as exc:
            if _old_api(exc):
                raise PluginError(self._old_api_message(exc, "pos_embed")) from exc
            raise
        return self.norm_pre(self.pos_drop(x)), state

    def stage_starting_at(self, index: int) -> str | None:
        """The stage block ``index`` opens after a transition (its key in ``transitions``), else
        ``None`` (block 0, and every block inside a stage)."""
        return self._stage_at.get(index)

    def run_block(self, index: int, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        """Block ``index`` (after the transition into its stage, if it starts one), then the
        position encoding's ``after_block``: (tokens, state) -> (tokens, state).

        Every boundary is checked: the tokens out must match the state out (a block that changes
        them returns a new state), and a block does not run when the position encoding's part
        inside attention was lost by an earlier merging block.
        """
        stage = self.stage_starting_at(index)
        try:
            if stage is not None:
                state = state.replace(stage_index=int(stage), block_index=None)
                x, state = self._checked(self.transitions[stage](x, state), state, self._transition_names[stage])
            state = state.replace(block_index=index)
            if state.positions_lost_at is not None:
                lost = state.positions_lost_at
                raise SpecError(state.positions_lost_message(f"attention in block {index}").replace(
                    f"block {lost} merged", f"block {lost} ({self._block_names[lost]}) merged"))
            block = self.blocks[index]
            if self.grad_checkpointing and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(block, x, state, use_reentrant=False)
            else:
                out = block(x, state)
            x, state = self._checked(out, state, f"block {index} ({self._block_names[index]})")
            x = self.pos_embed.after_block(x, state)
        except (TypeError, AttributeError) as exc:
            if _old_api(exc):
                raise PluginError(self._old_api_message(exc, f"block {index} ({self._block_names[index]})")) from exc
            raise
        return x, state

    @staticmethod
    def _checked(out: Any, state: ForwardState, who: str) -> tuple[torch.Tensor, ForwardState]:
        """A block's or transition's output as (tokens, state), refused when the tokens (B, N, D)
        do not match the state they come with (``N == state.num_tokens``)."""
        if isinstance(out, tuple) and (len(out) != 2 or not isinstance(out[1], ForwardState)):
            raise PluginError(f"{who} returned a tuple that is not (tokens, ForwardState); return x, or "
                              f"(x, state.regrid(...)) when the tokens changed: see {MIGRATION}")
        x, new_state = as_output(out, state)
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise PluginError(f"{who} returned {type(x).__name__} {tuple(getattr(x, 'shape', ()))}, "
                              "not tokens (B, N, D)")
        if x.shape[1] != new_state.num_tokens:
            raise PluginError(f"{who} returned {x.shape[1]} tokens but its forward state says "
                              f"{new_state.num_tokens}; a component that changes the tokens returns "
                              f"(x, state.regrid(grid, num_tokens=...)): see {MIGRATION}")
        return x, new_state

    def _old_api_message(self, exc: BaseException, who: str) -> str:
        """Names the innermost plugin module on the traceback (else ``who``) that treated the
        forward state as something else."""
        tb = exc.__traceback__
        while tb is not None:
            who = self._foreign.get(id(tb.tb_frame.f_locals.get("self")), who)
            tb = tb.tb_next
        return (f"{who} failed with {type(exc).__name__}: {exc}; it follows the vitlab 0.1 API, and since "
                f"API 2 forward(x, state) receives a ForwardState: see {MIGRATION}")

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
