"""timm's TinyViT (``tiny_vit``) read into a staged spec, its weights loaded, written back, and
counted: against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest
import torch

from vitlab.timm_interop import spec_from_timm, timm_kwargs

from timm_reference import (
    assert_derived_equals_full, assert_outputs_match_timm, assert_round_trip, fvcore_flops_of, randomize,
    randomize_stats,
)

timm = pytest.importorskip("timm")

# small versions of the layout, each with (input size, timm kwargs): windows that divide the grids
# (as the zoo's: 32 px, grids 8, 4, 2, 1) and windows the grids are zero-padded to (windows 3 on grids
# 4 and 2, 2 on 1), MLP and MBConv ratios that differ, another activation and local conv, a head of 10 or none
SMALL = {
    "tiny_vit_divides": ((32, 32), dict(embed_dims=(16, 16, 32, 32), depths=(2, 1, 2, 1), num_heads=(1, 1, 2, 2),
                                        window_sizes=(4, 4, 2, 1), num_classes=10)),
    "tiny_vit_padded": ((32, 32), dict(embed_dims=(16, 32, 32, 48), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 3),
                                       window_sizes=(3, 3, 3, 2), mlp_ratio=2.0, mbconv_expand_ratio=3.0,
                                       local_conv_size=5, act_layer=torch.nn.SiLU, num_classes=0)),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = {"OUTPUTS": tuple(SMALL), "ROUND_TRIPS": tuple(SMALL), "FLOPS": tuple(SMALL), "DERIVED": tuple(SMALL)}


def small(name: str):
    """timm's TinyVit of ``SMALL[name]``, its default input size in its ``pretrained_cfg`` (TinyVit takes none)."""
    from timm.models.tiny_vit import TinyVit

    size, kw = SMALL[name]
    tm = TinyVit(**kw)
    tm.pretrained_cfg = {"input_size": (3, *size)}
    return tm


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_weights_and_round_trip(name):
    from timm.models.tiny_vit import TinyVit

    ref = randomize_stats(randomize(small(name))).eval()
    model, report = assert_outputs_match_timm(ref)
    spec = model.spec
    assert [st.embed_dim for st in spec.stages] == list(SMALL[name][1]["embed_dims"])
    assert spec.block_plans()[0].selections["block"].name == "mbconv" and spec.img_hw == SMALL[name][0]
    back = assert_round_trip(spec, randomize_stats, timm_cls=TinyVit, exclude={"name", "img_size"})
    assert back.img_size == 224  # TinyVit keeps no image size: its model reads back at the default


@pytest.mark.parametrize("name", sorted(SMALL))
def test_flops_equal_fvcore_and_derived_equals_full(name):
    spec = spec_from_timm(small(name))
    full = assert_derived_equals_full(spec)
    assert full.flops == fvcore_flops_of(lambda: small(name), spec.img_hw)
    assert full.unsupported == {}


def test_zoo_names_and_their_sizes():
    spec = spec_from_timm("tiny_vit_21m_384")
    assert spec.img_size == 384 and [st.depth for st in spec.stages] == [2, 2, 6, 2]
    windows = [p.selections["attention"].params["window_size"] for p in spec.block_plans()]
    assert windows[2:] == [12, 12] + [24] * 6 + [12, 12]
    kw = timm_kwargs(spec)
    assert kw["window_sizes"] == (12, 12, 24, 12) and kw["embed_dims"] == (96, 192, 384, 576)


def test_zoo_flops_equal_fvcore():  # timm's widths: fvcore on a 5 M-parameter model at 224 px
    from timm_reference import assert_flops_match_fvcore

    _, full, _ = assert_flops_match_fvcore("tiny_vit_5m_224", rtol=0)
    assert full.stage_tokens == [3136, 784, 196, 49]


def test_what_timm_cannot_take_is_refused():
    from vitlab import load_spec

    data = spec_from_timm(small("tiny_vit_divides")).model_dump(exclude_defaults=True)
    with pytest.raises(Exception, match="one act_layer"):
        timm_kwargs(load_spec({**data, "mlp": {"name": "mlp", "params": {"act": "relu"}}}))
    shifted = {**data["attention"], "params": {**data["attention"]["params"], "shift": 1}}
    with pytest.raises(Exception, match="only window_size set"):
        timm_kwargs(load_spec({**data, "attention": shifted}))
