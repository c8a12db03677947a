"""Every timm family vitlab reads and writes back, one ``TimmFamily`` per module, listed once.

The order is the order of every question asked of them: which family claims a spec on export
(first claim wins: the VLM towers before Eva, whose RoPE they share; the hybrids before the
families that read the rest of a hybrid's spec; PiT, which claims any spec with stages, after the
staged families; timm's ``VisionTransformer``, which claims every spec, last) and whose table's
marker a checkpoint's keys match on load (CaiT and BEiT before EVA, whose marker theirs match).
Readers are chosen by exact class. Adding a family is adding a module and an entry here.
"""
from __future__ import annotations

from typing import Iterable

from ..bridge import Family
from ..family import TimmFamily
from . import pvt_v2  # PVTv2
from . import twins  # Twins (PCPVT, SVT)
from . import levit  # LeViT
from . import mvitv2  # MViTv2
from . import hiera  # Hiera
from . import hieradet_sam2  # SAM 2's Hiera (HieraDet)
from . import nest  # NesT
from . import davit  # DaViT
from . import coat  # CoaT-Lite (CoaT's parallel blocks are refused)
from . import gcvit  # GCViT
from . import tiny_vit  # TinyViT (before LeViT, whose stem it shares and whose claim would take it)
from . import volo  # VOLO (before CaiT, whose class-attention blocks it has, and PiT, whose marker its stem matches)
from . import (
    beit, cait, convit, deepseek, eva, gemma4, hybrid, naflex, pit, qwen3, relpos, sam, swin, vit, xcit,
)
from . import swin_v2, swin_v2_cr  # before swin: v2's checkpoints match swin's marker, its specs swin's claim

FAMILIES: tuple[TimmFamily, ...] = (
    qwen3.FAMILY, deepseek.FAMILY, gemma4.FAMILY, hybrid.FAMILY, volo.FAMILY, cait.FAMILY, beit.FAMILY, relpos.FAMILY,
    eva.FAMILY, naflex.FAMILY, xcit.FAMILY, sam.FAMILY, convit.FAMILY, swin_v2.FAMILY, swin_v2_cr.FAMILY, swin.FAMILY, tiny_vit.FAMILY, gcvit.FAMILY, pvt_v2.FAMILY, twins.FAMILY, levit.FAMILY, mvitv2.FAMILY, hiera.FAMILY, hieradet_sam2.FAMILY, nest.FAMILY, coat.FAMILY, davit.FAMILY, pit.FAMILY, vit.FAMILY,
)


def tables() -> list[Family]:
    """Every family's state-dict tables, in the families' order."""
    return [t for fam in FAMILIES for t in fam.tables]


def table_of(keys: Iterable[str]) -> Family | None:
    """The table whose checkpoints have these keys, ``None`` for timm's plain ViT names."""
    keys = list(keys)
    return next((t for t in tables() if t.matches(keys)), None)
