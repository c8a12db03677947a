"""timm's ``beit`` and ``vision_transformer_relpos`` families (issue 12): relative position biases,
a table per block (BEiT) or a bias MLP over log-spaced offsets (relpos). How their weights land
(BEiT's q / v biases fused with a zero key bias, the tables and bias MLPs under vitlab's names),
which image sizes each serves, and what timm's ``Beit`` and ``VisionTransformerRelPos`` cannot hold.

References are timm's own models and outputs; every timm model is built with ``pretrained=False``.
Coverage, outputs, FLOPs, derived counts and the round trip are checked with every other family's
in ``test_zoo_coverage.py`` and ``test_timm_parity.py``.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vitlab  # noqa: E402
from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_kwargs  # noqa: E402
from timm_reference import assert_close, outputs, randomize, with_changes  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

SMALL = dict(depth=2, embed_dim=64, num_heads=2)


# --- timm's weights, loaded -------------------------------------------------------------------------

def test_beit_weights_and_grid():
    """BEiT's q / v biases fuse with a zero key bias, its tables load under timm's name, and the
    table tied to the patch grid refuses what it cannot serve."""
    tm = randomize(timm.create_model("beit_base_patch16_224", pretrained=False, **SMALL, img_size=64))
    spec = spec_from_timm(tm)
    assert spec.attention.name == "mhsa_relpos" and not spec.dynamic_img_size
    model = build_model(spec)
    report = load_timm_weights(model, tm)
    assert report.ok, str(report)
    attn = model.blocks[1].attn
    assert spec.attention.params["qkv_bias"] == "qv"  # timm's zero key bias: a buffer, not a parameter
    with torch.no_grad():
        assert torch.count_nonzero(attn.qkv.k_bias) == 0
        assert torch.equal(attn.qkv.q_bias, tm.blocks[1].attn.q_bias)
        assert torch.equal(attn.qkv.v_bias, tm.blocks[1].attn.v_bias)
        assert torch.equal(attn.relative_position_bias_table, tm.blocks[1].attn.relative_position_bias_table)
    # a model with a trainable key bias takes the same weights, fused with the zero key bias
    full = build_model(vitlab.load_spec({**spec.to_dict(), "attention": {
        "name": "mhsa_relpos", "params": {**spec.attention.params, "qkv_bias": True}}}))
    assert load_timm_weights(full, tm).ok
    with torch.no_grad():
        bias = full.blocks[1].attn.qkv.bias  # (3 * 64,) q, k, v
        assert torch.count_nonzero(bias[64:128]) == 0 and torch.equal(bias[:64], tm.blocks[1].attn.q_bias)
    data = spec.to_dict()
    with pytest.raises(SpecError, match="tied to the patch grid"):
        vitlab.load_spec({**data, "dynamic_img_size": True})
    with pytest.raises(SpecError, match="one prefix token"):
        vitlab.load_spec({**data, "reg_tokens": 1})
    with pytest.raises(SpecError, match="shared by all blocks"):
        spec_from_timm("beit_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True)


@pytest.mark.parametrize("name, kw", [
    ("vit_relpos_medium_patch16_cls_224", dict(SMALL, rel_pos_dim=32)),
    ("vit_srelpos_small_patch16_224", dict(SMALL, rel_pos_dim=32)),
    ("vit_relpos_small_patch16_224", dict(SMALL, rel_pos_type="bias", class_token=True, global_pool="token")),
])
def test_relpos_weights_and_other_grids(name, kw):
    """timm's relpos bias modules load under vitlab's names; the bias MLP follows another grid
    (with dynamic_img_size, as timm's ``set_input_size``), the table refuses it."""
    tm = randomize(timm.create_model(name, pretrained=False, img_size=64, **kw)).eval()
    spec = spec_from_timm(tm)
    model = build_model(spec)
    assert load_timm_weights(model, tm).ok
    if spec.attention.name == "mhsa_relpos":
        with pytest.raises(SpecError, match="tied to the patch grid"):
            vitlab.load_spec({**spec.to_dict(), "dynamic_img_size": True})
        return
    model = build_model(vitlab.load_spec({**spec.to_dict(), "dynamic_img_size": True}))
    assert load_timm_weights(model, tm).ok
    other = timm.create_model(name, pretrained=False, img_size=(80, 48), **kw).eval()
    other.load_state_dict(tm.state_dict())
    x = torch.randn(2, 3, 80, 48, generator=torch.Generator().manual_seed(2))
    assert_close(outputs(model, x), outputs(other, x))


# --- back to timm: what it cannot hold ----------------------------------------------------------------

BEIT = ("beit_base_patch16_224", dict(SMALL, img_size=64))
RELPOS = ("test_vit_relpos", {})


@pytest.mark.parametrize("base, changes, refusal", [
    (BEIT, dict(attention={"params": {"qk_norm": True}}), "timm Beit equivalent: qk-norm"),
    (BEIT, dict(pos_embed={"name": "learned", "params": {"include_prefix": False}}), "position encoding 'learned'"),
    (BEIT, dict(final_norm=True), "a final norm and a norm after pooling together"),
    (BEIT, dict(block={"name": "respostnorm", "params": {"init_values": None}}), "block 'respostnorm'"),
    (RELPOS, dict(pos_embed={"name": "relpos_mlp", "params": {"hidden": 32}}),
     "shared by every block and one per block together"),
    (RELPOS, dict(dynamic_img_size=True), "VisionTransformerRelPos takes one image size"),
    (RELPOS, dict(mlp={"name": "swiglu", "params": {}}), "mlp 'swiglu'"),
    (RELPOS, dict(reg_tokens=1), "register tokens"),
])
def test_export_refuses_what_timm_cannot_hold(base, changes, refusal):
    """A spec the family's timm class cannot express is refused by ``timm_kwargs`` with the feature
    named (the spec itself is valid: vitlab builds it)."""
    data = with_changes(spec_from_timm(base[0], **base[1]).to_dict(), **changes)
    vitlab.load_spec(data)
    with pytest.raises(SpecError, match=refusal):
        timm_kwargs(data)
