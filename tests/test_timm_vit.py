"""timm's ``vision_transformer`` and ``deit`` families beyond the plain ViT (issue 12): BEiT-3's
sub-LN, SigLIP cropping its grid, ``ParallelThingsBlock`` and differential attention as read, and
what timm's ``VisionTransformer`` (DeiT's distilled one included) cannot hold.

References are timm's own models; every timm model is built with ``pretrained=False``, the reading
tests on the meta device. Coverage, outputs, FLOPs, derived counts and the round trip are checked
with every other family's in ``test_zoo_coverage.py`` and ``test_timm_parity.py``.
"""
from __future__ import annotations

import pytest

pytest.importorskip("timm")

from vitlab import SpecError  # noqa: E402
from vitlab.timm_interop import spec_from_timm, timm_kwargs, zoo  # noqa: E402


def test_beit3_and_cropping_siglip_read_as():
    assert spec_from_timm("beit3_base_patch16_224").attention.name == "mhsa_subln"
    siglip = spec_from_timm("vit_so400m_patch14_siglip_384")  # 384 px in 14 px patches: timm crops to 27 x 27
    assert siglip.patch_embed.params["stride"] == 14 and siglip.build_context().grid_size == (27, 27)


def test_parallel_and_differential_read_as():
    things = spec_from_timm(zoo.meta_model("vit_base_patch16_18x2_224"))
    assert things.block.name == "parallel_branches" and things.block.params["branches"] == 2
    assert spec_from_timm(zoo.meta_model("vit_dwee_patch16_reg1_gap_256")).attention.name == "mhsa_diff"
    dp = spec_from_timm(zoo.meta_model("vit_dpwee_patch16_reg1_gap_256"))
    assert (dp.block.name, dp.attention.name) == ("parallel", "mhsa_diff")


def test_distilled_export_refuses_what_deit_cannot_hold():
    spec = spec_from_timm("deit_tiny_distilled_patch16_224", depth=1)
    data = spec.to_dict()
    data["pos_embed"] = {"name": "learned", "params": {"include_prefix": False}}
    with pytest.raises(SpecError, match="distillation token without its position row"):
        timm_kwargs(data)


def test_export_refuses_what_timm_vision_transformer_cannot_hold():
    data = spec_from_timm("vit_dwee_patch16_reg1_gap_256", depth=1, img_size=64).to_dict()
    attn_only = {"name": "prenorm", "params": {"init_values": 1.0, "attn_only_layer_scale": True}}
    with pytest.raises(SpecError, match="attention branch only"):
        timm_kwargs({**data, "block": attn_only})
    with pytest.raises(SpecError, match="dual_lambda"):
        timm_kwargs({**data, "attention": {"name": "mhsa_diff", "params": {"dual_lambda": True}}})
