"""vitlab-rope: pos_embed 'rope2d' (axial 2-D RoPE) as an installed plugin."""
from __future__ import annotations

import cmath
import math
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.maps import attention_maps
from vitlab_rope import Rope2d, apply_rope, rope_tables

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "plugins"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}


def _model(sharpen: bool = False, **changes):
    model = vitlab.build_model(vitlab.load_spec({**TINY, **changes}), seed=0).eval()
    if sharpen:  # the default init (std 0.02) gives near-uniform attention; make it peaked
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(2))
    return model


def _permute_patches(images: torch.Tensor, perm: torch.Tensor, patch: int) -> torch.Tensor:
    """Move image patch perm[i] to grid position i (row-major), pixels inside a patch untouched."""
    B, C, H, W = images.shape
    gh, gw = H // patch, W // patch
    p = images.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, patch, patch)
    p = p[:, perm].reshape(B, gh, gw, C, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return p.reshape(B, C, H, W)


def test_registered_by_the_installed_distribution():
    info = vitlab.get_registry().get("pos_embed", "rope2d")
    assert info.cls is Rope2d and info.provider == "vitlab-rope"
    assert info.default_params() == {"theta": 100.0}


@pytest.mark.parametrize("prefix", [{}, {"reg_tokens": 2}])
def test_permuting_patches_changes_rope_output_but_not_none(prefix):
    """Average pooling over patches with no position information is exactly permutation-invariant;
    rope2d makes the output depend on where each patch is."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    xp = _permute_patches(x, perm, 8)
    with torch.no_grad():
        none = _model(True, pos_embed="none", pool="avg", **prefix)
        torch.testing.assert_close(none(xp), none(x), atol=1e-5, rtol=1e-5)
        rope = _model(True, pos_embed="rope2d", pool="avg", **prefix)
        assert (rope(xp) - rope(x)).abs().max() > 1e-2
        assert torch.equal(_permute_patches(x, torch.arange(16), 8), x)  # the helper itself


def test_rotation_depends_only_on_relative_position():
    hd, grid = 16, (6, 5)
    cos, sin = rope_tables(grid, hd, theta=100.0)
    g = torch.Generator().manual_seed(0)  # unseeded, a score near 0 once failed rtol alone
    q, k = torch.randn(hd, dtype=torch.float64, generator=g), torch.randn(hd, dtype=torch.float64, generator=g)
    cos, sin = cos.double(), sin.double()  # tables computed in float32: equal up to ~1e-6 absolute

    def score(pi, pj):  # q at patch pi, k at patch pj, (row, col)
        i, j = pi[0] * grid[1] + pi[1], pj[0] * grid[1] + pj[1]
        return apply_rope(q, cos[i], sin[i]) @ apply_rope(k, cos[j], sin[j])

    assert torch.isclose(score((0, 0), (1, 2)), score((3, 2), (4, 4)), atol=1e-6)
    assert torch.isclose(score((5, 4), (2, 1)), score((3, 3), (0, 0)), atol=1e-6)
    assert not torch.isclose(score((0, 0), (1, 2)), score((0, 0), (2, 1)))  # the two axes differ
    # a rotation: norms are kept
    assert torch.isclose(apply_rope(q, cos[7], sin[7]).norm(), q.norm())


def reference_tables(grid, head_dim, theta, num_prefix=0):
    """RoPE-ViT's axial tables written out with plain loops and ``math`` (the reference; nothing
    from vitlab_rope): the patch at row r, column c (row-major) turns pair t by
    ``c * theta ** (-4t / head_dim)`` for t < head_dim/4 (x axis), by ``r * theta ** (-4t' / head_dim)``,
    t' = t - head_dim/4, for the other pairs (y axis); both members of a pair share the angle;
    prefix tokens get angle 0."""
    quarter = head_dim // 4
    cos_rows, sin_rows = [], []
    positions = [None] * num_prefix + [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    for pos in positions:
        cos_row, sin_row = [], []
        for t in range(head_dim // 2):  # rotation pair t = channels (2t, 2t + 1)
            if pos is None:
                angle = 0.0
            elif t < quarter:
                angle = pos[1] * theta ** (-4 * t / head_dim)
            else:
                angle = pos[0] * theta ** (-4 * (t - quarter) / head_dim)
            cos_row += [math.cos(angle)] * 2
            sin_row += [math.sin(angle)] * 2
        cos_rows.append(cos_row)
        sin_rows.append(sin_row)
    return torch.tensor(cos_rows, dtype=torch.float64), torch.tensor(sin_rows, dtype=torch.float64)


@pytest.mark.parametrize("grid, head_dim, theta, num_prefix", [((3, 4), 16, 100.0, 0), ((2, 3), 8, 10_000.0, 2)])
def test_tables_follow_rope_vit(grid, head_dim, theta, num_prefix):
    """Both tables equal the loops above (float32 tables: float32 tolerance on angles up to ~3 rad)."""
    cos, sin = rope_tables(grid, head_dim, theta, num_prefix=num_prefix)
    ref_cos, ref_sin = reference_tables(grid, head_dim, theta, num_prefix)
    assert cos.shape == sin.shape == (num_prefix + grid[0] * grid[1], head_dim)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-6, rtol=0)


def test_apply_rope_is_the_pairwise_complex_rotation():
    """apply_rope against the complex product (a + ib) * e^{i angle} on each pair, per token, in plain
    Python (the reference), with the reference tables."""
    grid, hd = (2, 2), 8
    ref_cos, ref_sin = reference_tables(grid, hd, 100.0, num_prefix=1)
    x = torch.randn(5, hd, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = apply_rope(x, ref_cos, ref_sin)
    for n in range(5):
        for t in range(hd // 2):
            angle = math.atan2(ref_sin[n, 2 * t].item(), ref_cos[n, 2 * t].item())
            z = complex(x[n, 2 * t].item(), x[n, 2 * t + 1].item()) * cmath.exp(1j * angle)
            assert math.isclose(got[n, 2 * t].item(), z.real, abs_tol=1e-12)
            assert math.isclose(got[n, 2 * t + 1].item(), z.imag, abs_tol=1e-12)


def test_prefix_tokens_are_not_rotated():
    model = _model(pos_embed="rope2d", reg_tokens=3)
    rope = model.pos_embed
    transform = rope.qk_transform(model.grid_size)
    q, k = torch.randn(2, 2, 4 + 16, 16), torch.randn(2, 2, 4 + 16, 16)
    rq, rk = transform(q, k)
    torch.testing.assert_close(rq[:, :, :4], q[:, :, :4])
    torch.testing.assert_close(rk[:, :, :4], k[:, :, :4])
    assert not torch.allclose(rq[:, :, 5:], q[:, :, 5:])
    # nothing is added to the tokens and nothing is saved in the state dict
    x = torch.randn(2, 20, 32)
    assert rope(x, model.grid_size) is x
    assert not [k for k in model.state_dict() if k.startswith("pos_embed")]


def test_composes_with_qk_norm():
    """Maps from the rope + qk_norm model equal softmax(R(norm(q)) R(norm(k))ᵀ / sqrt(hd)): the
    rotation comes after the norm and attention applies it without knowing it is RoPE."""
    model = _model(pos_embed="rope2d", attention={"name": "mhsa", "params": {"qk_norm": True}}, norm="rmsnorm", reg_tokens=1)
    x = torch.randn(2, 3, 32, 32)
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, a, o: inputs.append(a[0])) for b in model.blocks]
    maps = attention_maps(model, x)
    for h in hooks:
        h.remove()
    transform = model.pos_embed.qk_transform(model.grid_size)
    for block, inp, got in zip(model.blocks, inputs, maps):
        attn = block.attn
        B, N, _ = inp.shape
        qkv = attn.qkv(inp).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = transform(attn.q_norm(qkv[0]), attn.k_norm(qkv[1]))
        expected = torch.softmax(q @ k.transpose(-2, -1) / attn.head_dim**0.5, dim=-1)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_head_dim_must_be_divisible_by_4():
    with pytest.raises(vitlab.SpecError, match=r"pos_embed: rope2d \(plugin 'vitlab-rope'\) needs head_dim .* = 6\) divisible by 4"):
        vitlab.load_spec({**TINY, "embed_dim": 24, "num_heads": 4, "pos_embed": "rope2d"})


def test_other_image_sizes_extend_positions():
    model = _model(pos_embed="rope2d", dynamic_img_size=True)
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 48, 40))
    assert out.shape == (1, 1 + 6 * 5, 32)
    # the tables of the recipe's 4 x 4 grid, class token first, head_dim 32 / 2 = 16: the reference
    ref_cos, ref_sin = reference_tables((4, 4), 16, 100.0, num_prefix=1)
    torch.testing.assert_close(model.pos_embed.cos.double(), ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.pos_embed.sin.double(), ref_sin, atol=1e-6, rtol=0)
    # the 6 x 5 grid of the 48 x 40 image extends the positions (RoPE-ViT): its transform rotates
    # each pair (a, b) of q and k to (a cos - b sin, a sin + b cos) with the reference tables
    ref_cos, ref_sin = reference_tables((6, 5), 16, 100.0, num_prefix=1)
    q, k = torch.randn(2, 1, 2, 31, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rq, rk = model.pos_embed.qk_transform((6, 5))(q, k)
    for x, got in ((q, rq), (k, rk)):
        a, b, c, s = x[..., 0::2], x[..., 1::2], ref_cos[:, 0::2], ref_sin[:, 0::2]
        expected = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_recipes_build_and_run():
    for name in ("vit_tiny_rope2d", "vit_tiny_rope2d_qknorm"):
        spec = vitlab.load_spec(RECIPES / f"{name}.yaml", overrides={"depth": 1})
        assert spec.pos_embed.name == "rope2d"
        model = vitlab.build_model(spec, seed=0).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.slow
def test_compiles_fullgraph():
    model = _model(pos_embed="rope2d", reg_tokens=1)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
