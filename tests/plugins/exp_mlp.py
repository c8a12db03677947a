"""MLP ``exp_mlp`` (fc2(expm1(fc1(x))): one aten::expm1 per block) and a FLOP rule for aten::expm1
counting a sentinel 7 per call."""
import torch

import vitlab

vitlab_api = 2  # the plugin API this module targets


class ExpMlp(vitlab.Mlp):
    """fc2(expm1(fc1(x))) (test plugin)."""

    name = "exp_mlp"

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        self.fc1 = torch.nn.Linear(ctx.embed_dim, ctx.mlp_hidden_dim, **ctx.factory_kwargs)
        self.fc2 = torch.nn.Linear(ctx.mlp_hidden_dim, ctx.embed_dim, **ctx.factory_kwargs)

    def forward(self, x):
        return self.fc2(torch.expm1(self.fc1(x)))


@vitlab.hookimpl
def vitlab_register_components(register):
    register(ExpMlp)


@vitlab.hookimpl
def vitlab_flop_handles(register):
    register("aten::expm1", flops=lambda inputs, outputs: 7)
