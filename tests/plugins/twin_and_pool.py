"""Registers attention ``twin`` as ``twin_attention`` does, and pool ``twin_pool`` of its own."""
import vitlab
from vitlab.components.attention import MultiHeadSelfAttention

vitlab_api = 2  # the plugin API this module targets


class OtherTwin(MultiHeadSelfAttention):
    """The other plugin's attention named twin."""

    name = "twin"


class TwinPool(vitlab.Pool):
    """Class-token pooling, only this plugin's."""

    name = "twin_pool"

    def forward(self, x):
        return x[:, 0]


@vitlab.hookimpl
def vitlab_register_components(register):
    register(OtherTwin)
    register(TwinPool)
