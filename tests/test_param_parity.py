"""Trainable parameters equal timm's (for every model read from the zoo: ``test_zoo_coverage``,
in its one pass over the zoo); here, how. A key bias timm keeps at zero outside its parameters
(BEiT, EVA, EVA-02, DINOv3 ``qkvb``) is a zero buffer in vitlab too (``qkv_bias: qv``), and a parallel block with one layer scale or one output bias
(timm's ``ParallelScalingBlock`` and its differential twin) has one here too. Both models are built
on the meta device: structure only, nothing allocated.
"""
from __future__ import annotations

import pytest
import timm
import torch

import vitlab
from vitlab.timm_interop import zoo
from vitlab.timm_interop.spec_from import spec_from_timm


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, buffers", [
    ("beit_base_patch16_224", ["blocks.0.attn.qkv.k_bias"]),
    ("vit_small_plus_patch16_dinov3_qkvb", ["blocks.0.attn.qkv.k_bias"]),
])
def test_the_zero_key_bias_is_a_buffer_outside_the_state_dict(name, buffers):
    spec = spec_from_timm(zoo.meta_model(name))
    assert spec.attention.params["qkv_bias"] == "qv"
    model = vitlab.VisionTransformer(spec, device="meta")
    assert set(buffers) <= dict(model.named_buffers()).keys()
    assert not set(buffers) & model.state_dict().keys()
    assert {"blocks.0.attn.qkv.q_bias", "blocks.0.attn.qkv.v_bias"} <= dict(model.named_parameters()).keys()


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "eva02_tiny_patch14_224", "vit_small_patch16_dinov3_qkvb",
                                  "vit_pwee_patch16_reg1_gap_256", "vit_dpwee_patch16_reg1_gap_256",
                                  "eva_giant_patch14_224"])
def test_weights_go_back_to_timm_exactly(name):
    """timm's perturbed weights load into the read model and export back as the same tensors, into
    the timm model the spec goes back to (strictly), whose parameters are as many as the original's."""
    from vitlab.timm_interop import load_timm_weights, timm_class, timm_kwargs, to_timm_state_dict

    kw = {"img_size": 64} if "dinov3" not in name else {}
    tm = timm.create_model(name, pretrained=False, depth=2, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model = vitlab.build_model(spec_from_timm(tm))
    assert load_timm_weights(model, tm).ok
    assert _count(model) == _count(tm)
    ours = to_timm_state_dict(model)
    back = timm_class(model.spec)(**timm_kwargs(model.spec))
    back.load_state_dict(ours)  # strict: every key, no other
    assert _count(back) == _count(tm)
    theirs = tm.state_dict()
    shared = ours.keys() & theirs.keys()  # EVA-02's SwiGLU goes back split (fc1_g / fc1_x), not packed
    assert any(k.endswith(("q_bias", "out_proj.bias", "ls.gamma")) for k in shared)
    for key in shared:
        assert torch.equal(ours[key], theirs[key]), key
