"""The size types that recipes and component params share: positive and non-negative integers,
a size given as one int or as ``[height, width]``, and a dropout rate."""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, StrictInt, ValidationError, WrapValidator

PosInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


def _size2_errors(value: Any, handler: Any) -> Any:
    """One clear message for a bad size instead of one per union member."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"expected a positive integer or [height, width] of positive integers, got {value!r}") from None


Size2 = Annotated[Union[PosInt, tuple[PosInt, PosInt]], WrapValidator(_size2_errors)]


def as_pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """A size given as one int or as (height, width) -> (height, width)."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
