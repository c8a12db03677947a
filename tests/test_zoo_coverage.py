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
    "swin_transformer_v2": Expect(total=12, reads=("swinv2_tiny_window8_256", "swinv2_base_window12to16_192to256")),
    # cosine attention, continuous position bias; v2-cr's extra norms every N blocks and at the end of stages
    "swin_transformer_v2_cr": Expect(total=16, reads=("swinv2_cr_tiny_224", "swinv2_cr_tiny_ns_224",
                                                      "swinv2_cr_huge_224")),
    "pvt_v2": Expect(total=7, reads=("pvt_v2_b0", "pvt_v2_b2_li")),  # spatial-reduction attention, conv MLP
    "twins": Expect(total=6, reads=("twins_pcpvt_small", "twins_svt_small")),  # locally-grouped and sub-sampled attention
    # 128s, 192, 384: a stage whose width its heads do not divide (LeViT's heads are key_dim wide)
    "levit": Expect(total=20, reads=("levit_128", "levit_conv_128", "levit_128s", "levit_conv_384_s8")),
    # mvitv2_large's stages widen in their last block's MLP (expand_attn=False): held by the next transition
    "mvitv2": Expect(total=8, reads=("mvitv2_tiny", "mvitv2_small_cls", "mvitv2_large")),
    "hiera": Expect(total=8, reads=("hiera_tiny_224", "hiera_small_abswin_256")),  # q-pooling, mask units
    # per-stage windows padded to whole windows, global blocks among them, abswin without antialiasing
    "hieradet_sam2": Expect(total=5, reads=("sam2_hiera_tiny", "sam2_hiera_large", "hieradet_small")),
    "nest": Expect(total=6, reads=("nest_tiny", "nest_tiny_jx")),  # attention within blocks, conv-pool aggregation
    # CoaT-Lite: conv position encodings per stage, factorized attention; 3 refused: the non-lite models' parallel
    # blocks mix all four stages' tokens at once
    "coat": Expect(total=8, refused={"parallel blocks": 3}, reads=("coat_lite_tiny", "coat_lite_medium_384")),
    # MBConv first stage, windows with a bias per |offset|, local conv; img_size from pretrained_cfg (384, 512)
    "tiny_vit": Expect(total=5, reads=("tiny_vit_5m_224", "tiny_vit_21m_224", "tiny_vit_21m_512")),
    "volo": Expect(total=11, reads=("volo_d1_224", "volo_d5_512")),  # outlook attention, class attention, aux head
    # channel attention (v2: Florence-2), conv position encodings in the blocks, norm-conv downsampling
    "davit": Expect(total=8, reads=("davit_tiny", "davit_base_fl")),
    "gcvit": Expect(total=5, reads=("gcvit_xxtiny", "gcvit_base")),  # global query tokens per stage, MBConv stem
}


def test_the_table_lists_every_family():
    assert list(COVERAGE) == list(zoo.FAMILIES) and set(zoo.families()) <= set(COVERAGE)


@pytest.mark.parametrize("family", [f for f in COVERAGE if f in zoo.families()])
def test_family_reads_goes_back_to_timm_and_counts_timms_parameters(family, zoo_coverage):
    expect = COVERAGE[family]
    cov = assert_family_reads(zoo_coverage(family), expect.refused, names=expect.reads, total=expect.total)
    # trainable parameters equal timm's for every model read (both built on meta): a key bias timm
    # keeps at zero is a buffer in vitlab too, a fused parallel block has one output bias
    differ = [f"{o.name}: vitlab {o.params[1]:,} vs timm {o.params[0]:,} ({o.params[1] - o.params[0]:+,})"
              for o in cov.outcomes if o.kind == "read" and o.params[0] != o.params[1]]
    assert not differ, "\n".join(differ)
    assert all(o.params[0] > 0 for o in cov.outcomes if o.kind == "read")
    # a refusal is a clean SpecError naming the model and the feature, never a crash
    for outcome in (o for o in cov.outcomes if o.kind == "refused"):
        with pytest.raises(SpecError) as info:
            spec_from_timm(zoo.meta_model(outcome.name))
        assert f"timm model '{outcome.name}'" in str(info.value) and outcome.reason in str(info.value)


def test_markdown_table_lists_families_and_totals(zoo_coverage):
    text = zoo.markdown([zoo_coverage("deit")])
    assert "| `deit` | 16 / 16 | 16 / 16 |" in text and "**16 / 16**" in text and timm.__version__ in text


# The README's table of timm's hierarchical families: its rows, the timm modules each row counts
README_ROWS = {
    "Swin v1, v2, v2-cr · Hiera, SAM 2 Hiera · PVTv2, Twins · NesT · LeViT · MViTv2 · DaViT · GCViT · TinyViT · VOLO": (
        "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr", "hiera", "hieradet_sam2", "pvt_v2",
        "twins", "nest", "levit", "mvitv2", "davit", "gcvit", "tiny_vit", "volo"),
    "CoaT": ("coat",), "CrossViT, TNT": ("crossvit", "tnt"),
}


def test_readme_table_of_hierarchical_families_is_true():
    """The README's counts: the models each family reads are ``COVERAGE``'s (its total less its
    refusals, which ``test_family_reads_goes_back_to_timm_and_counts_timms_parameters`` holds exact against the zoo), the
    totals timm's own model list per module (148 in timm 1.0.31, the issue's count)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    read_all = total_all = 0
    for row, modules in README_ROWS.items():
        total = sum(len(timm.list_models(module=m)) for m in modules)
        read = sum(COVERAGE[m].total - sum(COVERAGE[m].refused.values()) for m in modules if m in COVERAGE)
        assert all(COVERAGE[m].total == len(timm.list_models(module=m)) for m in modules if m in COVERAGE)
        assert re.search(rf"\| {re.escape(row)} \| {read} / {total} \|", readme), (row, read, total)
        read_all, total_all = read_all + read, total_all + total
    assert f"{read_all} of its {total_all} hierarchical ones" in " ".join(readme.split()), (read_all, total_all)
