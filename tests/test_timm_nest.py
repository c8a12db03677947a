"""timm's NesT (``nest``) read into a staged spec, its weights loaded, written back, and counted:
against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest
import torch

from vitlab import load_spec
from vitlab.timm_interop import spec_from_timm, timm_kwargs

from timm_reference import (
    assert_derived_equals_full, assert_flops_match_fvcore, assert_outputs_match_timm, assert_round_trip,
    fvcore_flops_of, randomize,
)

timm = pytest.importorskip("timm")

# small versions of the two layouts: three levels with symmetric pooling (a head of 10) and two levels
# with TF "same" pooling (the _jx models; no head); more heads than one, so the order timm merges
# them in (head_dim, heads) shows
SMALL = {
    "nest_tiny": dict(img_size=32, patch_size=2, embed_dims=(16, 32, 32), num_heads=(1, 2, 2), depths=(1, 1, 2),
                      num_classes=10),
    "nest_tiny_jx": dict(img_size=32, patch_size=4, num_levels=2, embed_dims=(16, 32), num_heads=(2, 4),
                         depths=(2, 1), num_classes=0, pad_type="same"),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = {"OUTPUTS": ("nest_tiny", "nest_tiny_jx"), "ROUND_TRIPS": ("nest_tiny", "nest_tiny_jx"),
           "FLOPS": ("nest_tiny", "nest_tiny_jx"), "DERIVED": ("nest_tiny", "nest_tiny_jx")}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_weights_and_round_trip(name):
    from timm.models.nest import Nest

    ref = randomize(Nest(**SMALL[name]).eval())
    model, report = assert_outputs_match_timm(ref)
    assert any("(head_dim, heads)" in n for n in report.notes) and any("blockified" in n for n in report.notes)
    spec = model.spec
    assert [st.embed_dim for st in spec.stages] == list(SMALL[name]["embed_dims"])
    assert spec.transition.params["padding"] == ("same" if "jx" in name else "symmetric")
    assert_round_trip(spec, timm_cls=Nest)


@pytest.mark.slow  # timm's widths: fvcore on a 17 M-parameter model
def test_flops_equal_fvcore_and_derived_equals_full():
    # nest_tiny_jx at 32 px in 2 px patches: all three levels, TF "same" pooling, timm's widths
    spec, full, _ = assert_flops_match_fvcore("nest_tiny_jx", rtol=0, img_size=32, patch_size=2)
    assert full.stage_tokens == [256, 64, 16]
    assert_derived_equals_full(spec)


def test_small_flops_equal_fvcore_and_derived_equals_full():
    # the symmetric-padding layout, three levels, a head of 10
    from timm.models.nest import Nest

    spec = spec_from_timm(Nest(**SMALL["nest_tiny"]))
    full = assert_derived_equals_full(spec)
    assert full.flops == fvcore_flops_of(lambda: Nest(**SMALL["nest_tiny"]), spec.img_hw)
    assert full.stage_tokens == [256, 64, 16] and full.unsupported == {}


def test_what_timm_cannot_take_is_refused():
    spec = spec_from_timm("nest_tiny", img_size=32, patch_size=2)
    data = spec.model_dump(exclude_defaults=True)
    data["transition"] = {"name": "conv_pool", "params": {"pos_embed": False}}
    for st in data["stages"][1:]:
        st.pop("transition", None)
    with pytest.raises(Exception, match="position table"):
        timm_kwargs(load_spec(data))
    data = spec.model_dump(exclude_defaults=True)
    data["attention"] = {**data["attention"], "params": {**data["attention"]["params"], "window_size": 8}}
    with pytest.raises(Exception, match="2\\^\\(levels - 1\\) windows"):
        timm_kwargs(load_spec(data))


def test_round_trip_of_timms_full_size_names():
    spec = spec_from_timm("nest_small_jx")
    assert [st.depth for st in spec.stages] == [2, 2, 20] and spec.img_size == 224
    kw = timm_kwargs(spec)
    assert kw["pad_type"] == "same" and kw["embed_dims"] == (96, 192, 384)
    with torch.device("meta"):
        assert spec_from_timm(timm.models.nest.Nest(**kw)) == spec.model_copy(update={"name": "timm_nest"})
