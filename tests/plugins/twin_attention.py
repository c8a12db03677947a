"""Registers attention ``twin`` (the duplicate-name tests install it next to ``twin_and_pool``)."""
import vitlab
from vitlab.components.attention import MultiHeadSelfAttention

vitlab_api = 2  # the plugin API this module targets


class TwinAttention(MultiHeadSelfAttention):
    """One of two plugins' attention named twin."""

    name = "twin"


@vitlab.hookimpl
def vitlab_register_components(register):
    register(TwinAttention)
