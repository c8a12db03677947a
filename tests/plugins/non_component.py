"""A plugin that registers something that is not a component class."""
import torch

import vitlab

vitlab_api = 2  # the plugin API this module targets


@vitlab.hookimpl
def vitlab_register_components(register):
    register(torch.nn.Linear)
