"""Multi-head self-attention on the fused ``scaled_dot_product_attention`` kernel.

``QKVAttention`` holds what every softmax-free or local variant shares (the fused qkv projection,
qk-norm, the output projection); plugins subclass it and write only how tokens are mixed.
"""
from __future__ import annotations

import torch
from typing import Annotated, Literal, Optional, Union

from pydantic import BeforeValidator, Field, StrictBool
from pydantic_core import PydanticCustomError
from torch import nn

from ..component import Attention
from ..context import BuildContext
from ..layers import Linear, QVBiasLinear
from ..state import ForwardState


def check_kv_heads(ctx: BuildContext, kv_heads: int | None) -> None:
    """Grouped-query attention needs ``kv_heads`` to divide the query heads (each group shares one)."""
    if kv_heads is not None and ctx.num_heads % kv_heads:
        raise ValueError(f"needs kv_heads dividing num_heads {ctx.num_heads}, got kv_heads {kv_heads}")


def _qkv_bias(value):
    """``true``, ``false`` or ``'qv'``, nothing else (no YAML ``yes``, no 1 / 0)."""
    if isinstance(value, bool) or value == "qv":
        return value
    raise PydanticCustomError("bool_type", "Input should be a valid boolean or 'qv'")


# ``qv``: biases on queries and values only, the key bias a zero buffer (BEiT's, EVA's q_bias / v_bias)
QKVBias = Annotated[Union[bool, Literal["qv"]], BeforeValidator(_qkv_bias)]


class QKVAttention(Attention):
    """Base of attention variants: qkv projection (timm's ``attn.qkv``), optional qk-norm, output
    projection (``attn.proj``). Not registered itself: it has no ``forward``.

    With ``kv_heads`` below ``num_heads`` (grouped-query; 1 = multi-query) the fused projection
    yields ``num_heads`` query heads and ``kv_heads`` key and value heads: its output width is
    ``(num_heads + 2 * kv_heads) * head_dim``, rows ordered q, k, v.

    ``qkv_bias: qv`` keeps the key bias at zero outside the parameters and the state dict, as timm's
    BEiT and EVA do: ``qkv.q_bias`` and ``qkv.v_bias`` are trained, ``qkv.k_bias`` is a zero buffer.
    """

    class Params(Attention.Params):
        qkv_bias: QKVBias = Field(
            True, description="bias on the qkv projection; qv: on queries and values only, the key bias a zero "
            "buffer (BEiT, EVA)")
        proj_bias: StrictBool = True
        qk_norm: StrictBool = False  # the recipe's norm over head_dim on queries and keys (ViT-22B)
        kv_heads: Optional[int] = Field(
            None, gt=0, description="key/value heads shared by groups of query heads (GQA; 1 = MQA); null = num_heads")

    @classmethod
    def check(cls, ctx: BuildContext, params: Params) -> None:
        check_kv_heads(ctx, params.kv_heads)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.num_heads = ctx.num_heads
        self.kv_heads = params.kv_heads or ctx.num_heads
        self.head_dim = ctx.head_dim
        self.num_prefix = ctx.num_prefix_tokens
        qkv_dim = (self.num_heads + 2 * self.kv_heads) * self.head_dim
        if params.qkv_bias == "qv":
            kv_dim = self.kv_heads * self.head_dim
            self.qkv = QVBiasLinear(ctx.embed_dim, (self.num_heads * self.head_dim, kv_dim, kv_dim),
                                    **ctx.factory_kwargs)
        else:
            self.qkv = Linear(ctx.embed_dim, qkv_dim, bias=params.qkv_bias, **ctx.factory_kwargs)
        self.q_norm = ctx.make("norm", dim=ctx.head_dim) if params.qk_norm else nn.Identity()
        self.k_norm = ctx.make("norm", dim=ctx.head_dim) if params.qk_norm else nn.Identity()
        self.proj = Linear(ctx.embed_dim, ctx.embed_dim, bias=params.proj_bias, **ctx.factory_kwargs)
        self.proj_drop = nn.Dropout(ctx.proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q (B, heads, N, head_dim), k and v (B, kv_heads, N, head_dim); q and k normed."""
        B, N, _ = x.shape
        if self.kv_heads == self.num_heads:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
            q, k, v = qkv.unbind(0)
        else:
            qkv = self.qkv(x).reshape(B, N, self.num_heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
            q, k, v = qkv.split([self.num_heads, self.kv_heads, self.kv_heads], dim=1)  # (B, h | kv, N, hd)
        return self.q_norm(q), self.k_norm(k), v

    def out(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> (B, N, D) through the output projection."""
        B, _, N, _ = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


class MultiHeadSelfAttention(QKVAttention):
    """Multi-head self-attention (fused SDPA), optional qk-norm; records maps on request."""

    name = "mhsa"

    class Params(QKVAttention.Params):
        attn_drop: float = Field(0.0, ge=0.0, lt=1.0)

    def __init__(self, ctx: BuildContext, params: Params):
        super().__init__(ctx, params)
        self.attn_drop = params.attn_drop

    def bias(self, state: ForwardState) -> torch.Tensor | None:
        """The additive attention bias of this layer: the state's shared one. A variant with a
        bias of its own (relative position) overrides this and adds the shared one to it."""
        return state.attn_bias

    def forward(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        q, k = state.transform_qk(q, k)
        drop = self.attn_drop if self.training else 0.0
        return self.out(self.attend(q, k, v, dropout_p=drop, bias=self.bias(state)))


COMPONENTS = (MultiHeadSelfAttention,)
