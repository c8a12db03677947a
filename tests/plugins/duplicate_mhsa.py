"""A plugin that registers an attention under the built-in name ``mhsa``."""
import vitlab
from vitlab.components.attention import MultiHeadSelfAttention

vitlab_api = 2  # the plugin API this module targets


class AnotherMhsa(MultiHeadSelfAttention):
    """Same name as the built-in."""

    name = "mhsa"


@vitlab.hookimpl
def vitlab_register_components(register):
    register(AnotherMhsa)
