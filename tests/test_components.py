"""Every registered component, parametrised over the registry: a tiny model selecting it builds,
runs, gives finite outputs of the right shape, trains (every parameter gets a gradient) and
compiles with ``fullgraph=True`` to the same output. A newly registered component is picked up
automatically; if it needs other settings, add them to ``COMPAT``.

Also: every boolean / literal parameter of every component, flipped, must change something
observable (the state dict's keys or shapes, or the outputs of two models built with the same
seed); the few switches that legitimately change nothing here are listed in ``INERT`` with the
reason. ``linear`` == ``conv`` patch embedding given the same weights; padding.
"""
from __future__ import annotations

import typing
import zlib

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import SpecError, build_model, load_spec

from conftest import TINY, TINY_PATCHES, repo_registry

pytestmark = pytest.mark.usefixtures("single_thread")

# vitlab's built-ins plus the repository's own plugins (plugins/*), loaded from source; never
# whatever else happens to be installed.
REGISTRY = repo_registry()
COMPONENTS = [(i.kind, i.name) for i in REGISTRY.components()]
# one register token besides the class token, so prefix handling is exercised everywhere
BASE = {**TINY, "reg_tokens": 1}
N_TOKENS = 1 + 1 + TINY_PATCHES  # class + register + 4 x 4 patches

# Settings a component needs besides being selected (none of the built-ins needs any).
COMPAT: dict[tuple[str, str], dict] = {
    ("patch_embed", "conv_stem"): {"patch_embed": {"name": "conv_stem", "params": {"channels": [8, 16, 32]}}},
    ("attention", "window"): {"attention": {"name": "window", "params": {"window_size": 2}}},
    ("attention", "tiny_vit"): {"attention": {"name": "tiny_vit", "params": {"window_size": 2}}},
    ("attention", "gcvit"): {"attention": {"name": "gcvit", "params": {"window_size": 2}}},  # windows divide 4x4
    ("patch_embed", "overlap"): {"patch_embed": {"name": "overlap", "params": {"padding": 0}}},  # the 4x4 grid
    ("mlp", "conv_mlp"): {"block": "prenorm_grid"},  # the block that hands its MLP the grid
    ("pos_embed", "coat_conv"): {"block": "coat_serial", "attention": "factor"},  # the block and attention that use it
    ("attention", "outlook"): {"class_token": False, "reg_tokens": 0, "pool": "avg"},  # the patch grid alone
    ("block", "gcvit"): {"class_token": False, "reg_tokens": 0, "pool": "avg"},  # its global queries: the only prefix
}
# Tried in turn when the plain selection does not validate (e.g. a pool without a class token).
FALLBACKS = [{"class_token": False, "pool": "avg"}, {"pool": "avg"}, {"embed_dim": 64, "num_heads": 4}]

# Flipped switches that change nothing observable in the configuration these tests build (32 px
# images, 8 px patches, eval mode): (kind, name, param) -> why. The test checks that each entry
# really is inert here, so the table cannot go stale; every other flip must show.
_NOTHING_TO_PAD = ("32 px images divide into 8 px patches, so there is nothing to pad "
                   "(test_padding_patch_embed checks padding against F.pad on a 30 px image)")
INERT: dict[tuple[str, str, str], str] = {
    # dividing coordinates by the shorter, longer or own side differs only on a non-square grid
    ("pos_embed", "rope", "normalize_coords"): "the test's 4x4 grid is square (and the axial variant ignores it)",
    ("patch_embed", "conv", "pad"): _NOTHING_TO_PAD,
    ("patch_embed", "linear", "pad"): _NOTHING_TO_PAD,
    ("patch_embed", "naflex", "pad"): _NOTHING_TO_PAD,
    ("patch_embed", "linear_pixnorm", "pad"): _NOTHING_TO_PAD,
    ("transition", "conv_embed", "in_norm"): "a flat tiny model has no stages, so no transition (tests/test_pvt.py)",
    ("transition", "q_pool", "residual"): "a flat tiny model has no stages, so no transition (tests/test_hiera.py)",
    ("transition", "levit_subsample", "act"): "a flat tiny model has no stages, so no transition (tests/test_levit.py)",
    ("transition", "levit_subsample", "conv"): "a flat tiny model has no stages, so no transition (tests/test_levit.py)",
    ("transition", "patch_merge", "norm_last"): "a flat tiny model has no stages, so no transition (tests/test_swin_v2.py)",
    ("transition", "conv_pool", "padding"): "a flat tiny model has no stages, so no transition (tests/test_nest.py)",
    ("transition", "conv_pool", "pos_embed"): "a flat tiny model has no stages, so no transition (tests/test_nest.py)",
    ("transition", "conv_merge", "act"): "a flat tiny model has no stages, so no transition (tests/test_tiny_vit.py)",
    ("transition", "coat_embed", "in_norm"): "a flat tiny model has no stages, so no transition (tests/test_coat.py)",
    ("transition", "pooling_block", "widen"): "a flat tiny model has no stages, so no transition (tests/test_mvit.py)",
    ("transition", "volo_downsample", "pos_embed"): "a flat tiny model has no stages, so no transition (tests/test_volo.py)",
    ("pos_embed", "naflex", "ar_preserving"): "the test's 4x4 grid is square: the square of its longer side is itself",
}
# Params a switch needs before it can show, given to both builds (default and flipped).
PROBES: dict[tuple[str, str, str], dict] = {
    ("pool", "map", "reduce"): {"latent_len": 2},  # with one latent, the first latent is the mean
    ("pos_embed", "rope", "include_prefix"): {"learned": True},  # which tokens the learned table covers
    ("block", "prenorm", "attn_only_layer_scale"): {"init_values": 0.1},  # which branches the layer scale covers
    ("block", "prenorm_grid", "attn_only_layer_scale"): {"init_values": 0.1},
    ("block", "prenorm_peg", "attn_only_layer_scale"): {"init_values": 0.1},
    ("block", "coat_serial", "attn_only_layer_scale"): {"init_values": 0.1},
    ("block", "prenorm_cpe", "attn_only_layer_scale"): {"init_values": 0.1},
    ("block", "parallel", "shared_layer_scale"): {"init_values": 0.1},  # one layer scale or two
}


# Model-level settings a switch needs before it can build, given to both builds.
MODEL_PROBES: dict[tuple[str, str, str], dict] = {
    # global queries are the tokens a gcvit block pools the grid into: every block makes 2x2 of them
    ("attention", "gcvit", "global_query"): {"block": {"name": "gcvit", "params": {"global_size": 2}},
                                             "class_token": False, "reg_tokens": 0, "pool": "avg"},
    # without its projection, the stem's feature map is the tokens: 4 px per token, 64 wide
    ("patch_embed", "hybrid", "proj"): {"patch_size": 4, "embed_dim": 64, "num_heads": 2},
}


def spec_selecting(kind: str, name: str, params: dict | None = None, **extra):
    if kind not in vitlab.ViTSpec.model_fields:
        pytest.skip(f"{kind} '{name}': a recipe does not select kind '{kind}' at its top level "
                    "(it is chosen elsewhere, e.g. inside stages), so a flat tiny model cannot hold it")
    compat = COMPAT.get((kind, name), {})
    own = {**compat.get(kind, {}).get("params", {}), **(params or {})}
    data = {**BASE, **compat, **extra, kind: {"name": name, "params": own}}
    errors = []
    for fallback in [{}] + FALLBACKS:
        try:
            return load_spec({**data, **{k: v for k, v in fallback.items() if k != kind}}, registry=REGISTRY)
        except SpecError as exc:
            errors.append(str(exc))
    pytest.fail(f"no tiny spec selecting {kind} '{name}' validates; add it to COMPAT:\n" + "\n".join(errors))


# Token-keeping pools that merge the patch grid into cells: their tokens out, written out for the
# tiny 4 x 4 grid (2 x 2 cells of the default k = 2; prefix tokens dropped)
CELL_POOL_TOKENS = {"unshuffle_mlp": 4, "cell_avg": 4}


def expected_shape(model, batch: int = 2):
    spec = model.spec
    n = CELL_POOL_TOKENS.get(spec.pool.name, spec.num_prefix_tokens + TINY_PATCHES)
    width = spec.num_classes or spec.embed_dim
    return (batch, n, width) if type(model.pool).keeps_tokens else (batch, width)


def test_registry_covers_every_kind():
    assert {k for k, _ in COMPONENTS} == set(vitlab.KINDS)


@pytest.mark.parametrize("kind, name", COMPONENTS, ids=[f"{k}-{n}" for k, n in COMPONENTS])
def test_component_builds_runs_and_compiles(kind, name):
    spec = spec_selecting(kind, name)
    model = build_model(spec, seed=0, registry=REGISTRY)
    assert spec.selection(kind).name == name
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    model.train()  # every parameter takes part in the forward
    out = model(x)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname

    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        out = model(x)
    assert tokens.shape == (2, spec.num_prefix_tokens + TINY_PATCHES, spec.embed_dim)
    assert out.shape == expected_shape(model)
    assert torch.isfinite(out).all()
    assert out.std() > 0

    torch._dynamo.reset()  # each model is new code to dynamo; do not hit the recompile limit
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), out, atol=1e-5, rtol=1e-5)


def _variants():
    """(kind, name, field, value) for every non-default value of every bool / Literal param."""
    out = []
    for kind, name in COMPONENTS:
        for field, info in REGISTRY.get(kind, name).cls.Params.model_fields.items():
            ann = info.annotation
            if ann is bool:
                values = [not info.default]
            elif typing.get_origin(ann) is typing.Literal:
                values = [v for v in typing.get_args(ann) if v != info.default]
            else:
                continue
            out += [(kind, name, field, v) for v in values]
    return out


VARIANTS = _variants()


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _outputs(model, x) -> torch.Tensor:
    """Tokens after the final norm and the pooled output / logits, flattened into one vector."""
    with torch.no_grad():
        return torch.cat([model.forward_features(x).flatten(), model(x).flatten()])


def _name_keyed_weights(model) -> None:
    """Overwrite every parameter with values drawn from its name alone (std 0.5): two models with
    the same parameter names and shapes then hold identical weights, large enough that a switch's
    effect is not lost under the near-zero initial tokens, biases and heads."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(pname.encode()))
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float32))


@pytest.mark.parametrize("kind, name, field, value", VARIANTS, ids=[f"{k}-{n}-{f}={v}" for k, n, f, v in VARIANTS])
def test_component_param_variant(kind, name, field, value):
    """The flipped switch builds and runs, and changes what the model is: its state dict (keys or
    shapes), or its outputs for the same seed and input. The reference is the same component with
    the switch at its default, built the same way."""
    probe, model_probe = PROBES.get((kind, name, field), {}), MODEL_PROBES.get((kind, name, field), {})
    default = spec_selecting(kind, name, probe, **model_probe)
    spec = spec_selecting(kind, name, {**probe, field: value}, **model_probe)
    assert spec.selection(kind).params[field] == value
    expected_spec = default.to_dict()
    expected_spec[kind]["params"][field] = value
    assert spec.to_dict() == expected_spec, "the two specs differ in more than the switch (another fallback?)"

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base = build_model(default, seed=0, registry=REGISTRY).eval()
    model = build_model(spec, seed=0, registry=REGISTRY).eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected_shape(model) and torch.isfinite(out).all()

    same_state = _shapes(model) == _shapes(base)
    same_out = same_state and torch.allclose(_outputs(model, x), _outputs(base, x), rtol=1e-5, atol=1e-6)
    if same_out:  # same weights as built; try weights large enough for any effect to show
        _name_keyed_weights(base)
        _name_keyed_weights(model)
        same_out = torch.allclose(_outputs(model, x), _outputs(base, x), rtol=1e-5, atol=1e-6)
    changed = not (same_state and same_out)
    reason = INERT.get((kind, name, field))
    if reason is not None:
        assert not changed, f"{kind} '{name}' switch {field}={value!r} is listed in INERT but changes the model: remove it"
        return
    assert changed, (
        f"{kind} '{name}': flipping switch {field} to {value!r} changes neither the state dict (keys, shapes) "
        "nor the outputs for a fixed seed and input; if it is inert here for a reason, add it to INERT"
    )


def test_param_variants_change_the_model():
    # a flipped switch must reach the module: compare parameter name sets against the default
    def names(**sel):
        return {n for n, _ in build_model(load_spec({**BASE, **sel}), device="meta").named_parameters()}

    base = names()
    assert "blocks.0.attn.q_norm.weight" in names(attention={"name": "mhsa", "params": {"qk_norm": True}}) - base
    assert "blocks.0.attn.qkv.bias" in base - names(attention={"name": "mhsa", "params": {"qkv_bias": False}})
    assert "blocks.0.attn.proj.bias" in base - names(attention={"name": "mhsa", "params": {"proj_bias": False}})
    assert "blocks.0.mlp.norm.weight" in names(mlp={"name": "mlp", "params": {"norm": True}}) - base
    assert "patch_embed.norm.weight" in names(patch_embed={"name": "conv", "params": {"norm": True}}) - base
    assert "pool.norm.weight" in names(pool={"name": "avg", "params": {"norm": True}})
    assert "norm.bias" in base - names(norm={"name": "layernorm", "params": {"bias": False}})
    assert "blocks.0.norm2.weight" in names(block={"name": "parallel", "params": {"shared_norm": False}})
    assert "blocks.0.norm2.weight" not in names(block="parallel")
    # learned positions: a table of prefix + patches, or patches only
    pe = lambda **p: build_model(load_spec({**BASE, "pos_embed": {"name": "learned", "params": p}}), device="meta").pos_embed.weight.shape
    assert pe() == (1, N_TOKENS, 32) and pe(include_prefix=False) == (1, TINY_PATCHES, 32)


# --- patch embedding ------------------------------------------------------------------------


def test_linear_patch_embed_equals_conv_with_same_weights():
    conv = build_model(load_spec({**BASE, "patch_embed": "conv"}), seed=0).eval()
    lin = build_model(load_spec({**BASE, "patch_embed": "linear"}), seed=1).eval()
    w = conv.patch_embed.proj.weight  # (D, C, ph, pw)
    state = conv.state_dict()
    state["patch_embed.proj.weight"] = w.reshape(w.shape[0], -1)  # (D, C * ph * pw)
    lin.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lin.patch_embed(x), conv.patch_embed(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(lin(x), conv(x), atol=1e-5, rtol=0)
        # and against an independent patchify: unfold gives (B, C*ph*pw, L) in the same order
        ref = F.unfold(x, kernel_size=8, stride=8).transpose(1, 2) @ w.reshape(32, -1).T + conv.patch_embed.proj.bias
        torch.testing.assert_close(lin.patch_embed(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("embed", ["conv", "linear"])
def test_padding_patch_embed(embed):
    spec = load_spec({**BASE, "img_size": 30, "patch_embed": {"name": embed, "params": {"pad": True}}})
    assert spec.build_context().grid_size == (4, 4)  # ceil(30 / 8)
    model = build_model(spec, seed=0).eval()
    x = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        torch.testing.assert_close(model.patch_embed(x), model.patch_embed(F.pad(x, (0, 2, 0, 2))), atol=1e-6, rtol=0)
        assert model(x).shape == (2, 10)
    with pytest.raises(SpecError, match="img_size"):
        load_spec({**BASE, "img_size": 30, "patch_embed": embed})


def test_sincos2d_table_against_formula():
    # big_vision posemb_sincos_2d: omega_i = 1 / T^(i / (D/4 - 1)); [sin(x w), cos(x w), sin(y w), cos(y w)]
    model = build_model(load_spec({**BASE, "pos_embed": "sincos2d", "class_token": False, "reg_tokens": 0, "pool": "avg"}))
    pe = model.pos_embed.pe[0]  # (16, 32)
    q = 32 // 4
    omega = [1.0 / 10_000 ** (i / (q - 1)) for i in range(q)]
    for idx, (gy, gx) in enumerate([(r, c) for r in range(4) for c in range(4)]):
        row = [torch.tensor(gx * o).sin() for o in omega] + [torch.tensor(gx * o).cos() for o in omega] \
            + [torch.tensor(gy * o).sin() for o in omega] + [torch.tensor(gy * o).cos() for o in omega]
        torch.testing.assert_close(pe[idx], torch.stack(row).float(), atol=1e-5, rtol=0)
    assert not list(model.pos_embed.parameters())  # fixed, nothing learned
    assert "pos_embed.pe" not in model.state_dict()  # not a weight to save


def test_prefix_tokens_skip_fixed_positions():
    model = build_model(load_spec({**BASE, "pos_embed": "sincos2d"}), seed=0)
    x = torch.randn(2, N_TOKENS, 32)
    y = model.pos_embed(x, vitlab.ForwardState.start((4, 4), 2))
    torch.testing.assert_close(y[:, :2], x[:, :2])  # class + register untouched
    torch.testing.assert_close(y[:, 2:], x[:, 2:] + model.pos_embed.pe)


@pytest.mark.slow
def test_inductor_compile_tiny_default():
    model = build_model(load_spec(TINY), seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
