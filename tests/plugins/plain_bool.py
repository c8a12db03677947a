"""A plugin whose Params use plain ``bool`` (not ``StrictBool``), also inside Optional and tuple."""
from typing import Optional

from pydantic import Field, field_validator

import vitlab

vitlab_api = 2  # the plugin API this module targets


class FlagPool(vitlab.Pool):
    """Class-token pooling with some switches (test plugin)."""

    name = "flag_pool"

    class Params(vitlab.Pool.Params):
        flag: bool = Field(False, description="a plain bool")
        maybe: Optional[bool] = None
        many: tuple[bool, ...] = (True, False)
        loose: bool = Field(False, strict=False)  # an explicit choice of lax parsing is kept
        count: int = Field(1, gt=0)

        @field_validator("flag")
        @classmethod
        def _seen(cls, v):  # validators of the plugin keep working on the strict field
            return v

    def forward(self, x):
        return x[:, 0]


@vitlab.hookimpl
def vitlab_register_components(register):
    register(FlagPool)
