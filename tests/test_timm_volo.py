"""timm's VOLO (``volo``) read into a three-stage spec, its weights loaded, written back, and counted:
against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest
import torch

from vitlab import load_spec
from vitlab.timm_interop import spec_from_timm, timm_kwargs

from timm_reference import (
    assert_derived_equals_full, assert_flops_match_fvcore, assert_outputs_match_timm, assert_round_trip,
    fvcore_flops_of, randomize, randomize_stats,
)

timm = pytest.importorskip("timm")

# small versions of the two layouts: timm's four stages (three transformer stages read as one) with the
# aux head and a head of 10; two stages, biased projections, an MLP ratio of 4, a wider stem, one
# class block, no head (no aux head either) on a non-square image
SMALL = {
    "volo_tiny": dict(layers=(1, 1, 2, 1), img_size=32, patch_size=4, stem_hidden_dim=8, embed_dims=(16, 32, 32, 32),
                      num_heads=(2, 4, 4, 4), num_classes=10),
    "volo_tiny_two_stage": dict(layers=(2, 1), img_size=(32, 48), patch_size=8, stem_hidden_dim=16,
                                embed_dims=(16, 24), num_heads=(2, 3), mlp_ratio=4.0, qkv_bias=True, num_classes=0,
                                post_layers=("ca",)),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = {"OUTPUTS": tuple(SMALL), "ROUND_TRIPS": tuple(SMALL), "FLOPS": tuple(SMALL), "DERIVED": tuple(SMALL)}


def _volo(name):
    from timm.models.volo import VOLO

    return VOLO(**SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_weights_and_round_trip(name):
    from timm.models.volo import VOLO

    ref = randomize_stats(randomize(_volo(name).eval()))
    model, report = assert_outputs_match_timm(ref)
    assert any("fused kv" in n for n in report.notes)
    spec = model.spec
    assert [st.depth for st in spec.stages] == [SMALL[name]["layers"][0], sum(SMALL[name]["layers"][1:]),
                                                len(SMALL[name].get("post_layers", "ab"))]
    assert spec.pool.name == ("token_aux" if SMALL[name]["num_classes"] else "token")
    assert_round_trip(spec, timm_cls=VOLO)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_flops_equal_fvcore_and_derived_equals_full(name):
    spec = spec_from_timm(_volo(name))
    full = assert_derived_equals_full(spec)
    assert full.flops == fvcore_flops_of(lambda: _volo(name), spec.img_hw)
    assert full.unsupported == {}


@pytest.mark.slow  # timm's widths: fvcore on a 27 M-parameter model
def test_flops_equal_fvcore_at_full_size():
    spec, full, _ = assert_flops_match_fvcore("volo_d1_224", rtol=0)
    assert full.stage_tokens == [784, 196, 197]


def test_timms_full_size_names_read_and_go_back():
    spec = spec_from_timm("volo_d5_512")
    assert [st.depth for st in spec.stages] == [12, 36, 2] and spec.img_size == 512
    assert spec.patch_embed.params["hidden_dim"] == 128
    kw = timm_kwargs(spec)
    assert kw["layers"] == (12, 36) and kw["embed_dims"] == (384, 768) and kw["mlp_ratio"] == (4.0, 4.0)
    with torch.device("meta"):
        assert spec_from_timm(timm.models.volo.VOLO(**kw)) == spec.model_copy(update={"name": "timm_volo"})


def test_what_timm_cannot_take_is_refused():
    spec = spec_from_timm(_volo("volo_tiny"))
    data = spec.model_dump(exclude_defaults=True)
    data["layers"][0]["attention"]["params"].update(kernel_size=5, padding=2)  # valid, not timm's
    with pytest.raises(Exception, match="VOLO: 'outlook'"):
        timm_kwargs(load_spec(data))
    data = spec.model_dump(exclude_defaults=True)
    data["stages"][1]["transition"]["params"]["pos_embed"] = False
    with pytest.raises(Exception, match="its position table"):
        timm_kwargs(load_spec(data))
