"""timm's GCViT (``gcvit``) read into a staged spec, its weights loaded, written back, and counted:
against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest
import torch

from vitlab import load_spec
from vitlab.timm_interop import spec_from_timm, timm_kwargs

from timm_reference import (
    assert_derived_equals_full, assert_flops_match_fvcore, assert_outputs_match_timm, assert_round_trip,
    fvcore_flops_of, randomize, with_changes,
)

timm = pytest.importorskip("timm")

# small versions of the two layouts: two stages with layer scale and a head of 10 (gcvit_small's kind),
# three stages without (gcvit_tiny's kind, no head), windows that differ per stage; stages of two or
# three blocks, so a global-query block follows each stage's first. (A stage of one block computes a
# global query nobody reads: timm does too, but fvcore's trace drops it as dead code.)
SMALL = {
    "gcvit_small": dict(img_size=32, embed_dim=16, depths=(2, 3), num_heads=(2, 4), window_size=(4, 2),
                        mlp_ratio=2.0, layer_scale=1e-5, num_classes=10),
    "gcvit_tiny": dict(img_size=32, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=(4, 2, 2),
                       num_classes=0),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = {"OUTPUTS": ("gcvit_small", "gcvit_tiny"), "ROUND_TRIPS": ("gcvit_small", "gcvit_tiny"),
           "FLOPS": ("gcvit_small", "gcvit_tiny"), "DERIVED": ("gcvit_small", "gcvit_tiny")}


def _timm(name):
    from timm.models.gcvit import GlobalContextVit

    return GlobalContextVit(**SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_weights_and_round_trip(name):
    from timm.models.gcvit import GlobalContextVit

    model, _ = assert_outputs_match_timm(randomize(_timm(name).eval()))
    spec = model.spec
    assert [st.embed_dim for st in spec.stages] == [16 * 2**i for i in range(len(SMALL[name]["depths"]))]
    # each stage's first block makes the global query, its odd blocks read it
    starts = [0, *torch.tensor(SMALL[name]["depths"]).cumsum(0).tolist()[:-1]]
    plans = spec.block_plans()
    assert [i for i, p in enumerate(plans) if p.selections["block"].params["global_size"]] == starts
    assert [i for i, p in enumerate(plans) if p.selections["attention"].params["global_query"]] == [s + 1 for s in starts]
    assert_round_trip(spec, timm_cls=GlobalContextVit)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_flops_equal_fvcore_and_derived_equals_full(name):
    spec = spec_from_timm(_timm(name))
    full = assert_derived_equals_full(spec)
    assert full.flops == fvcore_flops_of(lambda: _timm(name), spec.img_hw)
    assert full.stage_tokens == [64, 16, 4][: len(spec.stages)] and full.unsupported == {}


@pytest.mark.slow  # timm's widths: fvcore on a 12 M-parameter model
def test_flops_equal_fvcore_at_full_size():
    spec, full, _ = assert_flops_match_fvcore("gcvit_xxtiny", rtol=0)
    assert full.stage_tokens == [3136, 784, 196, 49]


def test_what_timm_cannot_take_is_refused():
    data = spec_from_timm(_timm("gcvit_small")).model_dump(exclude_defaults=True)
    with pytest.raises(Exception, match="global query"):  # global queries on the even blocks
        timm_kwargs(load_spec(with_changes(data, attention={"params": {"global_query": True}})))
    with pytest.raises(Exception, match="MLP ratios"):
        timm_kwargs(load_spec({**data, "layers": data["layers"] + [{"at": "1", "mlp_ratio": 3.0}]}))
    with pytest.raises(Exception, match="transitions other than gcvit_down"):
        timm_kwargs(load_spec(with_changes(data, transition={"name": "gcvit_down", "params": {"eps": 1e-6}},
                                           stages=[{**st, "transition": None} for st in data["stages"]])))


def test_round_trip_of_timms_full_size_names():
    spec = spec_from_timm("gcvit_small")
    assert [st.depth for st in spec.stages] == [3, 4, 19, 5] and spec.img_size == 224
    kw = timm_kwargs(spec)
    assert kw["window_size"] == (7, 7, 14, 7) and kw["layer_scale"] == 1e-5 and kw["embed_dim"] == 96
    with torch.device("meta"):
        assert spec_from_timm(timm.models.gcvit.GlobalContextVit(**kw)) == spec.model_copy(update={"name": "timm_globalcontextvit"})
