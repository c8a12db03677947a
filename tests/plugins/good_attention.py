"""A well-behaved plugin: cosine-similarity attention (queries and keys L2-normalised, a learned
temperature), registered as attention ``cosine_test``."""
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import vitlab
from vitlab.component import Attention

vitlab_api = 2  # the plugin API this module targets


class CosineAttention(Attention):
    """Cosine-similarity attention with a fixed logit scale (test plugin)."""

    name = "cosine_test"

    class Params(Attention.Params):
        scale: float = Field(10.0, gt=0.0)

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        self.num_heads, self.head_dim = ctx.num_heads, ctx.head_dim
        self.scale = params.scale
        self.qkv = nn.Linear(ctx.embed_dim, 3 * ctx.embed_dim, **ctx.factory_kwargs)
        self.proj = nn.Linear(ctx.embed_dim, ctx.embed_dim, **ctx.factory_kwargs)

    def forward(self, x, state):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        q, k = state.transform_qk(q, k)
        # attend() divides by sqrt(head_dim); undo it so the logits are scale * cos
        x = self.attend(q * self.scale * self.head_dim ** 0.5, k, v, bias=state.attn_bias)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


@vitlab.hookimpl
def vitlab_register_components(register):
    register(CosineAttention)
