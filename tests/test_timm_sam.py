"""timm's ``vision_transformer_sam`` family (Segment Anything's image encoder; issue 12): windowed
and global blocks with decomposed relative position and the neck as read, the position table as
loaded and resampled, and what timm's SAM encoder cannot hold.

References are timm's own models; every timm model is built with ``pretrained=False``. Coverage, outputs, FLOPs, derived counts and the round trip of the family are checked with every
other family's in ``test_zoo_coverage.py`` and ``test_timm_parity.py``; here, what is its own.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from vitlab import SpecError, build_model  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_kwargs  # noqa: E402
from timm_reference import randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")

FAMILY = "vision_transformer_sam"
SMALL = dict(embed_dim=64, num_heads=2)
# an 8 x 8 grid in 3 x 3 windows: SAM pads it to 9 x 9; block 1 attends globally
PADDED = dict(SMALL, depth=3, img_size=128, window_size=3, global_attn_indexes=[1])


def test_sam_reads_windows_global_blocks_and_the_neck():
    spec = spec_from_timm("samvit_base_patch16")  # on meta: 1024 px, 14 x 14 windows, global at 2, 5, 8, 11
    assert spec.attention.name == "window_decomposed" and spec.attention.params["window_size"] == 14
    assert [(layer.at, layer.attention.name) for layer in spec.layers] == [("2,5,8,11", "mhsa_decomposed")]
    assert spec.pool.name == "sam_neck" and spec.pool.params["channels"] == 256 and not spec.class_token
    assert not spec.final_norm and spec.num_classes == 0
    with pytest.raises(SpecError, match="rotary position embedding"):
        spec_from_timm("samvit_base_patch16", use_rel_pos=False, use_rope=True, img_size=64, depth=1)


def test_position_table_loads_as_rows_and_resamples():
    """SAM's (1, gh, gw, D) table is the learned table's rows; another grid is resampled as timm does."""
    kw = dict(SMALL, depth=1, window_size=2, global_attn_indexes=[0])
    tm = randomize(timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, **kw))
    model = build_model(spec_from_timm("samvit_base_patch16", img_size=96, **kw))
    report = load_timm_weights(model, tm.state_dict(), strict=False)
    assert report.resampled == ["pos_embed.weight"]
    # the global block's decomposed tables are sized by the grid: reported, not resampled
    assert [k for k, _, _ in report.mismatched] == ["blocks.0.attn.rel_pos_h", "blocks.0.attn.rel_pos_w"]
    small = build_model(spec_from_timm(tm))
    assert load_timm_weights(small, tm).ok
    assert torch.equal(small.pos_embed.weight.detach(), tm.pos_embed.detach().flatten(1, 2))


# --- back to timm: what it cannot hold ----------------------------------------------------------------

def test_export_refuses_what_sam_cannot_hold():
    data = spec_from_timm("samvit_base_patch16", **PADDED).to_dict()
    with pytest.raises(SpecError, match="prefix tokens"):
        timm_kwargs({**data, "class_token": True})
    with pytest.raises(SpecError, match="relative position in all blocks or none"):
        timm_kwargs({**data, "layers": [{"at": 1, "attention": {"name": "mhsa"}}]})
