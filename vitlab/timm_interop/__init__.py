"""timm interop: read a timm model of any of the ``families`` (``VisionTransformer``, DeiT, Eva,
BEiT, CaiT, XCiT, PiT, the VLM towers ...) into a ``ViTSpec``, load timm weights into vitlab models
(renaming, splitting fused projections, adapting prefix tokens, resampling position tables), and
hand vitlab models back to timm. Each family is one ``TimmFamily`` in ``families/``.

timm is imported inside the functions only, so ``import vitlab`` stays light.
"""
from __future__ import annotations

from .spec_from import spec_from_timm
from .to_timm import timm_class, timm_kwargs, to_timm_state_dict
from .weights import LoadReport, load_timm_weights

__all__ = ["LoadReport", "load_timm_weights", "spec_from_timm", "timm_class", "timm_kwargs", "to_timm_state_dict"]
