"""A plugin that registers an attention under the built-in name ``mhsa``."""
import vitlab
from vitlab.components.attention import MultiHeadSelfAttention


class AnotherMhsa(MultiHeadSelfAttention):
    """Same name as the built-in."""

    name = "mhsa"


@vitlab.hookimpl
def vitlab_register_components(register):
    register(AnotherMhsa)
