"""timm's HieraDet (SAM 2's Hiera, ``hieradet_sam2``) read into a staged spec, its weights loaded,
written back, and counted: against timm's own models and fvcore on timm's unfused model."""
from __future__ import annotations

import pytest
import torch

from vitlab import analyze, build_model, load_spec
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_class, timm_kwargs, to_timm_state_dict

from timm_reference import assert_close, fvcore_flops, outputs, randomize

timm = pytest.importorskip("timm")

AT_64 = {"embed_dim": 16, "num_heads": 1, "global_pos_size": (4, 4),
         "pretrained_cfg_overlay": {"input_size": (3, 64, 64)}}  # HieraDet's default input size is its cfg's
# small versions of two layouts on a 64 px image (grids 16, 8, 4, 2):
# padded: a stage whose window (6) exceeds its 4x4 grid, padded in its blocks and in the transition
#   out of it, and a global block among windowed ones (sam2_hiera_*);
# global: layer scale, a classifier, a stage attending globally and a last transition that does
#   not pool (q_pool=2), so the last grid stays 4x4 (hieradet_small)
SMALL = {
    "padded": ("sam2_hiera_tiny", {**AT_64, "stages": (1, 2, 3, 2), "global_att_blocks": (4,),
                                   "window_spec": (4, 4, 6, 2)}),
    "global": ("hieradet_small", {**AT_64, "stages": (1, 2, 2, 2), "global_att_blocks": (4, 5), "q_pool": 2,
                                  "window_spec": (4, 2, 4, 2), "num_classes": 10}),
}

# what this module checks, per check of test_timm_parity's tables (read by its test that every family
# is checked on two models): the models whose layouts the tests here run
CHECKED = dict.fromkeys(("OUTPUTS", "ROUND_TRIPS", "FLOPS", "DERIVED"), ("sam2_hiera_tiny", "hieradet_small"))


@pytest.mark.parametrize("case", sorted(SMALL))
def test_outputs_weights_and_round_trip(case):
    name, kw = SMALL[case]
    ref = randomize(timm.create_model(name, pretrained=False, **kw)).eval()
    spec = spec_from_timm(ref)
    assert spec.img_size == 64 and spec.dynamic_img_size and spec.pos_embed.params["antialias"] is False
    model = build_model(spec).eval()
    report = load_timm_weights(model, ref)
    assert report.ok and not report.missing and not report.unexpected, str(report)
    x = torch.randn(2, 3, *spec.img_hw, generator=torch.Generator().manual_seed(1))
    want = outputs(ref, x)
    assert_close(outputs(model, x), want)
    kwargs = timm_kwargs(spec)
    assert kwargs["window_spec"] == (4, 4, 6, 2) if case == "padded" else (4, 2, 0, 2)  # stage 2 all global
    back = timm_class(spec)(**kwargs).eval()
    back.load_state_dict(to_timm_state_dict(model), strict=True)
    assert_close(outputs(back, x), want, rtol=1e-6)
    back.pretrained_cfg = ref.pretrained_cfg  # HieraDet keeps no image size: its default input size is the cfg's
    assert spec_from_timm(back) == spec.model_copy(update={"name": spec_from_timm(back).name})


@pytest.mark.parametrize("case", sorted(SMALL))
def test_small_flops_equal_fvcore_but_the_resampling(case):
    """vitlab counts the bicubic resampling of abswin's 4x4 global table to the 16x16 grid (16 per
    output value, 16 channels); fvcore has no handle for it and counts 0."""
    name, kw = SMALL[case]
    spec = spec_from_timm(name, **kw)
    full = analyze(spec)
    assert full.flops - fvcore_flops(name, spec.img_hw, **kw) == 16 * 16 * 16 * 16
    assert analyze(spec, method="derived").flops == full.flops and full.unsupported == {}
    assert full.stage_tokens == ([256, 64, 16, 4] if case == "padded" else [256, 64, 16, 16])


@pytest.mark.slow
def test_sam2_hiera_tiny_flops_equal_fvcore_at_224():
    kw = {"pretrained_cfg_overlay": {"input_size": (3, 224, 224)}}
    spec = spec_from_timm("sam2_hiera_tiny", **kw)
    full = analyze(spec)
    resampling = 16 * 96 * 56 * 56  # abswin's 7x7 table to the 56x56 grid, 96 channels
    assert full.flops - fvcore_flops("sam2_hiera_tiny", spec.img_hw, **kw) == resampling
    assert full.stage_tokens == [3136, 784, 196, 49]


def test_sam2_hiera_tiny_reads_as_timm_builds_it():
    spec = spec_from_timm("sam2_hiera_tiny")
    assert spec.img_size == 896 and [st.depth for st in spec.stages] == [1, 1, 6, 1]
    kwargs = timm_kwargs(spec)
    assert kwargs["window_spec"] == (8, 4, 14, 7) and kwargs["global_att_blocks"] == (5, 7, 9)
    assert kwargs["stages"] == (1, 2, 7, 2) and kwargs["global_pos_size"] == (7, 7)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["layers"].append({"at": "2", "attention": {"name": "window", "params": {"window_size": 2}}}),
     "windows \\[2, 6\\] in stage 2"),
    (lambda d: d["stages"][1]["transition"]["params"].update(window_size=0), "pools and attends globally"),
    (lambda d: d.update(mlp_ratio=3.0), "MLP ratio other than 4"),
], ids=["two-windows-in-a-stage", "global-pooling-transition", "mlp-ratio"])
def test_what_timm_cannot_take_is_refused(change, message):
    data = spec_from_timm(SMALL["padded"][0], **SMALL["padded"][1]).model_dump(mode="json")
    change(data)
    with pytest.raises(Exception, match=message):
        timm_kwargs(load_spec(data))
