"""timm's ``xcit`` family (issue 12): the two stages it reads as, its components against timm's own
modules (Fourier encoding, convolutional stem), features without pooling, and what timm's ``Xcit``
cannot hold.

References are timm's own modules and outputs; every timm model is built with ``pretrained=False``.
Coverage, outputs, FLOPs, derived counts and the round trip of the family are checked with every
other family's in ``test_zoo_coverage.py`` and ``test_timm_parity.py``; here, what is its own.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vitlab  # noqa: E402
from vitlab import SpecError  # noqa: E402
from vitlab.context import BuildContext  # noqa: E402
from vitlab.state import ForwardState  # noqa: E402
from vitlab.timm_interop import spec_from_timm, timm_kwargs  # noqa: E402
from timm_reference import assert_close, assert_outputs_match_timm, randomize, randomize_stats  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")


# --- reading, on the meta device ------------------------------------------------------------------

def test_xcit_spec_is_two_stages():
    spec = spec_from_timm("xcit_small_24_p8_384")  # timm: depth 24, tokens_norm, 8 px patches
    assert [(st.depth, st.embed_dim, st.num_heads) for st in spec.stages] == [(24, 384, 8), (2, 384, 8)]
    assert spec.stages[1].transition.name == "class_token" and not spec.class_token
    assert (spec.patch_embed.name, spec.pos_embed.name, spec.attention.name, spec.block.name) == (
        "xcit_stem", "fourier", "xca", "xcit")
    (layer,) = spec.layers
    assert (layer.at, layer.attention.name, layer.block.name) == ("24-25", "class_attn", "xcit_class")
    assert layer.block.params["tokens_norm"] is True
    assert spec_from_timm("xcit_nano_12_p16_224").layers[0].block.params["tokens_norm"] is False


@pytest.mark.parametrize("kw, feature", [
    (dict(drop_path_rate=0.1), "stochastic depth"),
    (dict(cls_attn_layers=0), "without class-attention blocks"),
])
def test_refusals_name_the_feature(kw, feature):
    with pytest.raises(SpecError, match=feature) as info:
        spec_from_timm("xcit_nano_12_p16_224", depth=1, **kw)
    assert "timm model 'xcit_nano_12_p16_224'" in str(info.value)


# --- components against timm's own modules -----------------------------------------------------------

def _context(**kw) -> BuildContext:
    base = dict(embed_dim=32, num_heads=4, mlp_hidden_dim=128, img_size=(64, 48), patch_size=(16, 16), in_chans=3,
                grid_size=(4, 3), class_token=False, reg_tokens=0, depth=1)
    return BuildContext(**{**base, **kw})


def test_fourier_encoding_is_timms_on_any_grid():
    """The ``fourier`` position encoding added to tokens equals timm's ``PositionalEncodingFourier``
    output (its 1x1 conv's weights copied), on a non-square grid and after a prefix token."""
    from timm.models.xcit import PositionalEncodingFourier

    from vitlab.components.fourier import FourierPosEncoding

    theirs = randomize(PositionalEncodingFourier(hidden_dim=16, dim=32, temperature=100.0))
    ours = FourierPosEncoding(_context(), FourierPosEncoding.Params(hidden_dim=16, temperature=100.0))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 1 + 5 * 3, 32)
    with torch.no_grad():
        got = ours(x, ForwardState.start((5, 3), num_prefix=1))
        pe = theirs(2, 5, 3).flatten(2).transpose(1, 2)  # (B, N, D)
    assert torch.equal(got[:, :1], x[:, :1])
    assert_close(got[:, 1:], x[:, 1:] + pe)


@pytest.mark.parametrize("patch", [8, 16])
def test_stem_is_timms_conv_patch_embed(patch):
    from timm.models.xcit import ConvPatchEmbed

    from vitlab.components.xcit_stem import XcitStem

    theirs = randomize_stats(randomize(ConvPatchEmbed(img_size=64, patch_size=patch, embed_dim=32)), mean=0.2).eval()
    ours = XcitStem(_context(patch_size=(patch, patch)), XcitStem.Params()).eval()
    ours.load_state_dict(theirs.state_dict())  # the same names: proj.{2 i}.{0: conv, 1: bn}
    x = torch.randn(2, 3, 56, 40)  # not whole patches: both zero-pad inside the convolutions
    with torch.no_grad():
        tokens, grid = theirs(x)
        assert_close(ours(x), tokens)
    assert XcitStem.grid_size((56, 40), (patch, patch), None) == grid


# --- timm's weights, loaded -------------------------------------------------------------------------

def test_features_without_pooling_match_timm():
    """``global_pool=''``: every token after the final norm, the patches as the class blocks left them."""
    tm = randomize(timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=1, img_size=64, global_pool="",
                                     num_classes=0))
    tm = randomize_stats(tm, mean=0.2).eval()
    assert_outputs_match_timm(tm, weights=tm)


# --- back to timm: what it cannot hold ----------------------------------------------------------------

@pytest.mark.parametrize("change, named", [
    (lambda d: d["block"]["params"].update(lpi_kernel=5), "lpi_kernel 5"),
    (lambda d: d["layers"][0]["block"]["params"].update(init_values=None), "layer scales"),
    (lambda d: d.update(drop_path_rate=0.1), "stochastic depth"),
    (lambda d: d["pos_embed"]["params"].update(hidden_dim=16), "position encoding 'fourier'"),
])
def test_export_refuses_what_timm_cannot_hold(change, named):
    data = spec_from_timm("xcit_nano_12_p16_224", depth=1).to_dict()
    change(data)
    with pytest.raises(SpecError, match=named):
        timm_kwargs(data)


@pytest.mark.parametrize("where", [{"attention": "xca"}, {"layers": [{"at": 1, "attention": "xca"}]}])
def test_xca_under_an_attention_bias_is_refused_when_the_recipe_validates(where):
    """xca has no token pairs to bias: a position encoding that gives an attention bias
    (``relpos_mlp``) is refused at validation, at the entry that chose xca, not at the forward."""
    data = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "pos_embed": "relpos_mlp",
            **where}
    with pytest.raises(SpecError) as info:
        vitlab.load_spec(data)
    loc = "attention" if "attention" in where else "layers.0.attention"
    assert f"{loc}: xca has no place for the attention bias pos_embed 'relpos_mlp' gives" in str(info.value)
