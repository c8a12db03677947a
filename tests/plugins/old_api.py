"""Components written for the vitlab 0.1 API, ported only as far as declaring the version:
``old_cosine`` calls its second argument as 0.1's ``qk_transform``; ``old_block`` takes ``(x)``;
``shrinking`` drops a token without returning a new state."""
import torch
import torch.nn.functional as F

import vitlab
from vitlab.components.attention import QKVAttention

vitlab_api = 2  # the plugin API this module targets


class OldCosine(QKVAttention):
    """0.1 attention: forward(x, qk_transform=None)."""

    name = "old_cosine"

    def forward(self, x, qk_transform=None):
        q, k, v = self.qkv_heads(x)
        if qk_transform is not None:
            q, k = qk_transform(q, k)  # in API 2 this is the ForwardState: not callable
        return self.out(self.attend(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v))


class OldBlock(vitlab.Block):
    """0.1 block: forward(x)."""

    name = "old_block"

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        self.mlp = ctx.make("mlp")

    def forward(self, x):
        return x + self.mlp(x)


class Shrinking(vitlab.Block):
    """Drops the last token and returns no new state."""

    name = "shrinking"

    def forward(self, x: torch.Tensor, state: vitlab.ForwardState) -> torch.Tensor:
        return x[:, :-1]


@vitlab.hookimpl
def vitlab_register_components(register):
    for cls in (OldCosine, OldBlock, Shrinking):
        register(cls)
