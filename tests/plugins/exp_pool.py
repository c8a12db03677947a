"""Pool ``exp_pool`` (exp of the class token: one aten::exp per forward), declaring aten::exp
free -- the same operator ``exp_mlp`` counts as 7."""
import torch

import vitlab

vitlab_api = 2  # the plugin API this module targets


class ExpPool(vitlab.Pool):
    """exp of the class token (test plugin)."""

    name = "exp_pool"

    def forward(self, x):
        return torch.exp(x[:, 0])


@vitlab.hookimpl
def vitlab_register_components(register):
    register(ExpPool)


@vitlab.hookimpl
def vitlab_flop_handles(register):
    register("aten::exp", free="elementwise")
