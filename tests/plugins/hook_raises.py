"""A plugin whose hook registers a valid component, then raises: nothing of it may stay registered."""
import vitlab
from vitlab.components.attention import MultiHeadSelfAttention

vitlab_api = 2  # the plugin API this module targets


class HalfAttention(MultiHeadSelfAttention):
    """Registered before the hook fails."""

    name = "half_registered"


@vitlab.hookimpl
def vitlab_register_components(register):
    register(HalfAttention)
    raise RuntimeError("the plugin's own bug")
