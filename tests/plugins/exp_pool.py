"""Pool ``exp_pool`` (expm1 of the class token: one aten::expm1 per forward), declaring aten::expm1
free -- the same operator ``exp_mlp`` counts as 7."""
import torch

import vitlab

vitlab_api = 2  # the plugin API this module targets


class ExpPool(vitlab.Pool):
    """expm1 of the class token (test plugin)."""

    name = "exp_pool"

    def forward(self, x):
        return torch.expm1(x[:, 0])


@vitlab.hookimpl
def vitlab_register_components(register):
    register(ExpPool)


@vitlab.hookimpl
def vitlab_flop_handles(register):
    register("aten::expm1", free="elementwise")
