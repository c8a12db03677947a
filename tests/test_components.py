"""Every registered component, parametrised over the registry: a tiny model selecting it builds,
runs, gives finite outputs of the right shape, trains (every parameter gets a gradient) and
compiles with ``fullgraph=True`` to the same output. A newly registered component is picked up
automatically; if it needs other settings, add them to ``COMPAT``.

Also: every boolean / literal parameter of every component, flipped; ``linear`` == ``conv``
patch embedding given the same weights; padding.
"""
from __future__ import annotations

import typing

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
    ("attention", "window"): {"attention": {"name": "window", "params": {"window": 2}}},
}
# Tried in turn when the plain selection does not validate (e.g. a pool without a class token).
FALLBACKS = [{"class_token": False, "pool": "avg"}, {"pool": "avg"}, {"embed_dim": 64, "num_heads": 4}]


def spec_selecting(kind: str, name: str, params: dict | None = None, **extra):
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


def expected_shape(model, batch: int = 2):
    spec = model.spec
    n = spec.num_prefix_tokens + TINY_PATCHES
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


@pytest.mark.parametrize("kind, name, field, value", VARIANTS, ids=[f"{k}-{n}-{f}={v}" for k, n, f, v in VARIANTS])
def test_component_param_variant(kind, name, field, value):
    spec = spec_selecting(kind, name, {field: value})
    assert spec.selection(kind).params[field] == value
    model = build_model(spec, seed=0, registry=REGISTRY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == expected_shape(model) and torch.isfinite(out).all()


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
    y = model.pos_embed(x, (4, 4))
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
