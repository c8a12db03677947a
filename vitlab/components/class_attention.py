"""Class attention (CaiT, Touvron et al. 2021; XCiT): a class token that joins the tokens late and
then gathers from them while they stay as they are.

The pieces, as a staged recipe writes them (stage 2 of a CaiT)::

    stages:
      - {depth: 24, embed_dim: 384, num_heads: 8}                  # self-attention, no class token
      - {depth: 2, embed_dim: 384, num_heads: 8, transition: class_token}
    layers:
      - {at: "24-25", attention: class_attn, block: {name: cait_class, params: {init_values: 1.0e-5}}}

* transition ``class_token``: prepends one learned class token, parameter ``cls_token`` (1, 1, D)
  (timm's name), to tokens that have none: (B, P + N, D) -> (B, 1 + P + N, D); the grid is
  unchanged and the next stage's context and forward state count one more prefix token
  (``class_token: true``).
* attention ``class_attn``: queries from the first (class) token only, keys and values from every
  token: (B, N, D) -> (B, 1, D), the class token's update alone (timm's ``ClassAttn``: separate
  ``q``, ``k``, ``v`` and ``proj`` linears). Its attention map is (B, heads, 1, N). The state's
  shared attention bias is used by its first row; a q/k position transform (RoPE) acts on the
  class token's query as it would in self-attention.
* block ``cait_class``: CaiT's class-attention block (timm ``LayerScaleBlockClassAttn``): only the
  class token changes, ``c + ls1(attn(norm1([c, x])))``, then ``c + ls2(mlp(norm2(c)))``; the
  other tokens pass through. With another attention it keeps that attention's class-token row.

``class_attn`` is meant for such a block: in a block that adds the attention's output to every
token (``prenorm``) its (B, 1, D) would broadcast to all of them.
"""
from __future__ import annotations

import torch
from pydantic import Field, StrictBool
from torch import nn

from ..component import Attention, Transition
from ..context import BuildContext
from ..layers import Linear
from ..state import ForwardState
from .block import TwoBranchBlock


class ClassAttention(Attention):
    """Class attention: the first token queries every token; returns its update (B, 1, D)."""

    name = "class_attn"

    class Params(Attention.Params):
        qkv_bias: StrictBool = True
        proj_bias: StrictBool = True
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        if not ctx.num_prefix_tokens:
            raise ValueError("needs a class token leading the tokens (a class_token transition into this stage, "
                             "or class_token: true)")

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        D, fk = ctx.embed_dim, ctx.factory_kwargs
        self.num_heads, self.head_dim = ctx.num_heads, ctx.head_dim
        self.q = Linear(D, D, bias=params.qkv_bias, **fk)
        self.k = Linear(D, D, bias=params.qkv_bias, **fk)
        self.v = Linear(D, D, bias=params.qkv_bias, **fk)
        self.proj = Linear(D, D, bias=params.proj_bias, **fk)
        self.proj_drop = nn.Dropout(ctx.proj_drop)
        self.attn_drop = params.attn_drop

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, heads, N, head_dim)."""
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        B, N, D = x.shape
        q = self._heads(self.q(x[:, :1]))  # (B, heads, 1, head_dim): the class token asks
        k, v = self._heads(self.k(x)), self._heads(self.v(x))  # (B, heads, N, head_dim)
        if state.qk_transform is not None:
            # the class token's query as self-attention would transform it: row 0 of a full-length
            # query (the other rows are zeros, dropped after), so any q/k transform (RoPE) treats it
            # as it treats a prefix token, whatever its convention
            full, k = state.transform_qk(torch.cat([q, q.new_zeros(B, self.num_heads, N - 1, self.head_dim)], 2), k)
            q = full[:, :, :1]
        bias = None if state.attn_bias is None else state.attn_bias[..., :1, :]  # the class token's row
        out = self.attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0, bias=bias)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, 1, D)))  # (B, 1, D)


class ClassToken(Transition):
    """Prepends a learned class token (``cls_token``) to tokens without one; grid and width stay."""

    name = "class_token"

    @classmethod
    def out_prefix(cls, class_token: bool, reg_tokens: int, params: Transition.Params) -> tuple[bool, int]:
        return True, reg_tokens

    @classmethod
    def check(cls, ctx: BuildContext, params: Transition.Params) -> None:
        if ctx.class_token:
            raise ValueError("receives tokens that already lead with a class token (set class_token: false)")
        if ctx.in_dim != ctx.embed_dim:
            raise ValueError(f"keeps the width: the stage's embed_dim {ctx.embed_dim} must equal the previous "
                             f"stage's {ctx.in_dim}")

    def __init__(self, ctx: BuildContext, params: Transition.Params):
        super().__init__(ctx, params)
        self.cls_token = nn.Parameter(torch.empty(1, 1, ctx.embed_dim, **ctx.factory_kwargs))
        nn.init.trunc_normal_(self.cls_token, std=0.02)  # timm's CaiT and XCiT

    def forward(self, x: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        state.check_tokens(x, f"transition '{self.name}'")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + P + N, D)
        return x, state.regrid(state.grid, num_tokens=state.num_tokens + 1, num_prefix=state.num_prefix + 1)


class CaitClassBlock(TwoBranchBlock):
    """CaiT's class-attention block: only the class token is updated, by the (class) attention
    over all tokens and then the MLP; the other tokens pass through (timm ``LayerScaleBlockClassAttn``)."""

    name = "cait_class"

    @classmethod
    def check(cls, ctx: BuildContext, params: TwoBranchBlock.Params) -> None:
        ClassAttention.check(ctx, params)

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        c = x[:, :1]  # (B, 1, D)
        # class_attn returns the class token's row alone; a self-attention's first row is the same
        # update, with every other query computed in vain
        a = self.attn(self.norm1(x), state)[:, :1]
        c = c + self.drop_path1(self.ls1(a))
        c = c + self.drop_path2(self.ls2(self.mlp(self.norm2(c))))
        return torch.cat([c, x[:, 1:]], dim=1)


COMPONENTS = (ClassAttention, ClassToken, CaitClassBlock)
