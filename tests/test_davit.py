"""DaViT's pieces in the architecture space: ``channel`` attention (DaViT's and Florence-2's v2),
the ``prenorm_cpe`` block and the ``norm_conv`` transition (even and odd kernels, odd grids).

References: the channel attentions written out by hand, timm's own ``Downsample`` and ``ConvPosEnc``.
"""
from __future__ import annotations

import pytest
import torch

from vitlab import build_model, load_spec
from vitlab.errors import SpecError
from vitlab.state import ForwardState

davit = pytest.importorskip("timm.models.davit")


def _spec(kernel: int = 2, img: int = 32, **changes):
    return load_spec({
        "img_size": img, "patch_size": 4, "class_token": False, "pos_embed": "none", "num_classes": 0,
        "pool": "avg", "final_norm": False, "block": "prenorm_cpe",
        "attention": {"name": "window", "params": {"window_size": 4}},
        "transition": {"name": "norm_conv", "params": {"kernel_size": kernel}},
        "layers": [{"at": "1-3:2", "attention": {"name": "channel"}}],
        "stages": [{"depth": 2, "embed_dim": 16, "num_heads": 2}, {"depth": 2, "embed_dim": 32, "num_heads": 4}],
        **changes})


@pytest.mark.parametrize("v2", [False, True], ids=["davit", "v2"])
def test_channel_attention_by_hand(v2):
    """Per head, (head_dim x head_dim) weights over channels: DaViT's softmax(kᵀ v / sqrt(hd)) on the
    queries, v2's softmax(qᵀ k / sqrt(N)) on the values; no L2 norm, no temperature."""
    spec = _spec(layers=[{"at": "1-3:2", "attention": {"name": "channel", "params": {"v2": v2}}}])
    attn = build_model(spec, seed=0).eval().blocks[1].attn
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (B, h, N, hd) each
        if v2:
            out = v @ ((q * 10 ** -0.5).transpose(-1, -2) @ k).softmax(-1).transpose(-1, -2)
        else:
            out = q @ ((k * 8 ** -0.5).transpose(-1, -2) @ v).softmax(-1).transpose(-1, -2)
        want = attn.proj(out.transpose(1, 2).reshape(2, 10, 16))
        got = attn(x, ForwardState.start((2, 5), 0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", [2, 3])
@pytest.mark.parametrize("grid", [(8, 8), (7, 5)])
def test_norm_conv_equals_timm_downsample(kernel, grid):
    """``norm_conv`` is timm's ``Downsample`` (LayerNorm2d, then a conv of stride 2): an even kernel
    pads an odd grid on the right and bottom, an odd one pads kernel // 2 all round."""
    model = build_model(_spec(kernel), seed=0).eval()
    down = model.transitions["1"]
    ref = davit.Downsample(16, 32, kernel_size=kernel).eval()
    ref.load_state_dict(down.state_dict(), strict=True)
    x = torch.randn(2, grid[0] * grid[1], 16)
    with torch.no_grad():
        out, state = down(x, ForwardState.start(grid, 0).replace(stage_index=1))
        want = ref(x.transpose(1, 2).reshape(2, 16, *grid))
    assert state.grid == tuple(want.shape[-2:]) == tuple(-(-g // 2) for g in grid)
    torch.testing.assert_close(out, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_prenorm_cpe_adds_conv_position_encodings_before_each_branch():
    """With attention and MLP zeroed, the block is the two position encodings in a row, timm's ConvPosEnc."""
    block = build_model(_spec(), seed=0).eval().blocks[0]
    for lin in (block.attn.proj, block.mlp.fc2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    ref = davit.ConvPosEnc(16)
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        image = x.transpose(1, 2).reshape(2, 16, 8, 8)
        ref.load_state_dict(block.cpe1.state_dict())
        image = ref(image)
        ref.load_state_dict(block.cpe2.state_dict())
        want = ref(image).flatten(2).transpose(1, 2)
        got = block(x, ForwardState.start((8, 8), 0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_even_cpe_kernel_is_refused():
    with pytest.raises(SpecError, match="odd cpe_kernel"):
        _spec(block={"name": "prenorm_cpe", "params": {"cpe_kernel": 4}})
