"""A plugin whose Params has a misspelt annotation (``boool``). With postponed annotations the
class is created anyway and pydantic only complains when it is first used."""
from __future__ import annotations

import vitlab
from vitlab.components.attention import MultiHeadSelfAttention

vitlab_api = 2  # the plugin API this module targets


class TypoAttention(MultiHeadSelfAttention):
    """Params cannot be completed."""

    name = "typo_attention"

    class Params(MultiHeadSelfAttention.Params):
        extra_flag: boool = True  # noqa: F821  (the misspelling under test)


@vitlab.hookimpl
def vitlab_register_components(register):
    register(TypoAttention)
