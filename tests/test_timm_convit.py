"""timm's ``convit`` family (ConViT's gated positional self-attention; issue 12): the two stages it
reads as, GPSA's initialisation against timm's, and what timm's ConViT cannot hold.

References are timm's own modules; every timm model is built with ``pretrained=False``. Coverage, outputs, FLOPs, derived counts and the round trip of the family are checked with every
other family's in ``test_zoo_coverage.py`` and ``test_timm_parity.py``; here, what is its own.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import spec_from_timm, timm_kwargs  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

FAMILY = "convit"
COMPARED = {  # timm's embed_dim is per head: convit_tiny is 4 x 48
    "convit_tiny": dict(depth=3, local_up_to_layer=2, img_size=64),
    "convit_small": dict(depth=2, local_up_to_layer=1, img_size=64, embed_dim=16, global_pool="avg"),
    "convit_base": dict(depth=2, local_up_to_layer=1, img_size=48, embed_dim=8, qkv_bias=True, num_classes=0,
                        locality_strength=0.5),
}


def test_convit_is_two_stages_joined_by_the_class_token():
    spec = spec_from_timm("convit_tiny")  # 12 blocks, GPSA in the first 10
    assert spec.attention.name == "gpsa" and not spec.class_token
    assert [(layer.at, layer.attention.name) for layer in spec.layers] == [("10-11", "mhsa")]
    assert [(s.depth, s.transition.name if s.transition else None) for s in spec.stages] == [
        (10, None), (2, "class_token")]
    assert spec.embed_dim == 192 and spec.pool.name == "token"
    with pytest.raises(SpecError, match="class token never inserted"):
        spec_from_timm("convit_tiny", depth=2, local_up_to_layer=2)


def test_gpsa_starts_local_as_convit():
    """A model built here starts as timm's: identity values, the same positional attention weights."""
    kw = dict(depth=2, local_up_to_layer=1, img_size=48, embed_dim=8, locality_strength=0.5)
    tm = timm.create_model("convit_base", pretrained=False, **kw)
    attn = build_model(spec_from_timm(tm), seed=0).blocks[0].attn
    with torch.no_grad():
        assert torch.equal(attn.v.weight, tm.blocks[0].attn.v.weight)
        # 16 heads = a 4 x 4 grid of offsets: every row of pos_proj is set by the local init
        assert torch.equal(attn.pos_proj.weight, tm.blocks[0].attn.pos_proj.weight)
        assert torch.equal(attn.gating_param, tm.blocks[0].attn.gating_param)


# --- back to timm: what it cannot hold ----------------------------------------------------------------

def test_export_refuses_what_convit_cannot_hold():
    data = spec_from_timm("convit_tiny", **COMPARED["convit_tiny"]).to_dict()
    with pytest.raises(SpecError, match="gpsa in the first stage"):
        timm_kwargs({**data, "layers": [{"at": "1-2", "attention": {"name": "mhsa", "params": {"qkv_bias": False}}}]})
