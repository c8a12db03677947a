"""timm's isotropic ViT zoo (issue 12), one table: for every family ``zoo.families()`` lists, which
models ``spec_from_timm`` reads (all of them), that whatever it does not read would be refused with
a vitlab error naming the feature, and that every model read goes back to timm (timm's class built
from ``timm_kwargs`` on meta reads back as the same spec).

The reference is timm's own model list. Each family's coverage is computed once per session
(the ``zoo_coverage`` fixture); every timm model is built with ``pretrained=False`` on meta.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

timm = pytest.importorskip("timm")

from vitlab import SpecError  # noqa: E402
from vitlab.timm_interop import spec_from_timm, zoo  # noqa: E402
from timm_reference import assert_family_reads  # noqa: E402


@dataclass(frozen=True)
class Expect:
    total: int | None = None  # how many models timm lists for the family (None: whatever it has)
    refused: dict = field(default_factory=dict)  # phrase of a refusal -> how many refusals name it
    reads: tuple[str, ...] = ()  # models that must be among the family's and read


MIXED = tuple(f"vit_{s}_patch16_rope_mixed{ape}_224" for s in ("small", "base", "large") for ape in ("", "_ape"))
SAPIENS2 = tuple(f"vit_{s}_patch16_sapiens2" for s in ("base", "large", "huge", "giant", "5b"))
PARALLEL_THINGS = ("vit_small_patch16_18x2_224", "vit_base_patch16_18x2_224")
DIFFERENTIAL = ("vit_dwee_patch16_reg1_gap_256", "vit_dlittle_patch16_reg1_gap_256", "vit_dpwee_patch16_reg1_gap_256")

COVERAGE = {  # every family of zoo.FAMILIES, in its order
    # BEiT-3's sub-LN, cropping SigLIP (384 px in 14 px patches), ParallelThingsBlock, differential attention
    "vision_transformer": Expect(reads=("beit3_base_patch16_224", "beit3_giant_patch14_336",
                                        "vit_so400m_patch14_siglip_384", *PARALLEL_THINGS, *DIFFERENTIAL)),
    "deit": Expect(total=16),
    "eva": Expect(reads=MIXED + SAPIENS2),  # RoPE-Mixed's learned frequencies, Sapiens2
    "vision_transformer_sam": Expect(total=4),
    "beit": Expect(),
    "vision_transformer_relpos": Expect(),
    "cait": Expect(total=10),
    "vision_transformer_hybrid": Expect(total=14),
    "xcit": Expect(total=28),
    "convit": Expect(total=3),
    "naflexvit": Expect(total=14),
    "qwen3_vit": Expect(),
    "gemma4_vit": Expect(),
    "deepseek_vit": Expect(),
    "swin_transformer": Expect(total=9, reads=("swin_tiny_patch4_window7_224", "swin_s3_tiny_224")),  # shifted windows
}


def test_the_table_lists_every_family():
    assert list(COVERAGE) == list(zoo.FAMILIES) and set(zoo.families()) <= set(COVERAGE)


@pytest.mark.parametrize("family", [f for f in COVERAGE if f in zoo.families()])
def test_family_reads_and_goes_back_to_timm(family, zoo_coverage):
    expect = COVERAGE[family]
    cov = assert_family_reads(zoo_coverage(family), expect.refused, names=expect.reads, total=expect.total)
    # a refusal is a clean SpecError naming the model and the feature, never a crash
    for outcome in (o for o in cov.outcomes if o.kind == "refused"):
        with pytest.raises(SpecError) as info:
            spec_from_timm(zoo.meta_model(outcome.name))
        assert f"timm model '{outcome.name}'" in str(info.value) and outcome.reason in str(info.value)


def test_markdown_table_lists_families_and_totals(zoo_coverage):
    text = zoo.markdown([zoo_coverage("deit")])
    assert "| `deit` | 16 / 16 | 16 / 16 |" in text and "**16 / 16**" in text and timm.__version__ in text
