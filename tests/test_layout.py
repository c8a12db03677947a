"""Per-block layouts (``layers``), stages and transitions, the forward state, GQA and window
attention, and that FLOPs, tokens and maps follow the real shapes.

References: closed forms written out here, timm's own modules (SAM's windowed ``Block``), and the
full trace for derived counts (two independent ways of counting: one traces every block, the
other only distinct (block, input) pairs).
"""
from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab import analyze, build_model, load_spec
from vitlab.layout import format_indices, parse_at
from vitlab.maps import record_attention, stages
from vitlab.state import ForwardState

from conftest import TINY

pytestmark = pytest.mark.usefixtures("single_thread")


def _full_and_derived(spec, **kw):
    full = analyze(spec, method="full", **kw).to_dict()
    derived = analyze(spec, method="derived", **kw).to_dict()
    for d in (full, derived):
        for key in ("method", "derived", "derivation"):
            d.pop(key)
    return full, derived


# --- layers: which blocks, and errors that name the entry ---------------------------------------

@pytest.mark.parametrize("at, expected", [
    (3, [3]), ([4, 1, 1], [1, 4]), ("0-2,5", [0, 1, 2, 5]), (" 7 , 1-2", [1, 2, 7]), ("11", [11]),
])
def test_parse_at(at, expected):
    assert parse_at(at, 12) == expected
    assert parse_at(format_indices(expected), 12) == expected


@pytest.mark.parametrize("at, message", [
    (12, "block 12 does not exist (depth 12)"), ("0-99999999999999", "block 99999999999999 does not exist"),
    ("3-1", "runs backwards"), ("a", "'a' in 'a' is not an index"), ([], "names no block"), (True, "expected"),
])
def test_parse_at_errors(at, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_at(at, 12)


def test_layer_errors_name_the_entry():
    with pytest.raises(vitlab.SpecError) as err:
        load_spec({"extends": "vit_base_patch16_224", "layers": [{"at": "2,12", "attention": "mhsa"}]})
    assert err.value.lines() == ["layers.0.at: block 12 does not exist (depth 12)"]
    with pytest.raises(vitlab.SpecError) as err:
        load_spec({**TINY, "layers": [{"at": 0}, {"at": 1, "attention": {"params": {"kv_heads": 3}}}]})
    assert err.value.lines() == ["layers.1.attention: mhsa needs kv_heads dividing num_heads 2, got kv_heads 3"]
    with pytest.raises(vitlab.SpecError, match=r"layers\.0\.mlp\.params\.actt: unknown parameter 'actt'"):
        load_spec({**TINY, "layers": [{"at": 0, "mlp": {"params": {"actt": "relu"}}}]})
    with pytest.raises(vitlab.SpecError, match=r"layers\.0\.attention\.name: unknown attention 'mhas'.*did you mean 'mhsa'"):
        load_spec({**TINY, "layers": [{"at": 0, "attention": "mhas"}]})


def test_layers_override_per_block_and_later_entries_win():
    spec = load_spec("vit_tiny_sam_window")
    model = build_model(spec, device="meta")
    kinds = [type(b.attn).name for b in model.blocks]
    assert kinds == ["window", "window", "mhsa"] * 4
    assert all(b.attn.window == 7 for b in model.blocks if type(b.attn).name == "window")
    spec = load_spec({**TINY, "depth": 3, "layers": [
        {"at": "0-2", "mlp_ratio": 2.0}, {"at": 1, "mlp_ratio": 1.0, "attention": {"params": {"qk_norm": True}}}]})
    model = build_model(spec, device="meta")
    assert [b.mlp.fc1.out_features for b in model.blocks] == [64, 32, 64]
    assert [isinstance(b.attn.q_norm, vitlab.Norm) for b in model.blocks] == [False, True, False]
    again = vitlab.ViTSpec.from_yaml(vitlab.dump_spec(spec), registry=spec.registry)
    assert again == spec  # resolved overrides dump and load back to an equal spec


def test_show_prints_the_resolved_layout():
    from click.testing import CliRunner

    from vitlab.cli import cli, load_commands

    load_commands()
    out = CliRunner().invoke(cli, ["show", "vit_tiny_sam_window"])
    assert out.exit_code == 0, out.output
    assert "# blocks 0-1,3-4,6-7,9-10 (stage 0): attention=window(window_size=7)" in out.output
    assert "# blocks 2,5,8,11 (stage 0): attention=mhsa" in out.output


# --- grouped-query attention: a closed form --------------------------------------------------------

def test_mqa_tiny_closed_form():
    """ViT-Ti/16 at 224 px whose first six blocks share one key/value head. Closed form in fvcore's
    convention (1 per multiply-add; layer norm 5 per element; biases free), written out here."""
    D, h, hd, N, hidden, depth, classes = 192, 3, 64, 197, 768, 12, 1000
    kv = 1

    def block(kv_heads):
        qkv_out = (h + 2 * kv_heads) * hd
        params = 2 * D + D * qkv_out + qkv_out + D * D + D + 2 * D + D * hidden + hidden + hidden * D + D
        flops = (N * D * qkv_out + N * D * D  # qkv, proj
                 + 2 * h * N * N * hd  # q·kᵀ and attn·v: each query head against its shared kv head
                 + 2 * N * D * hidden + 2 * 5 * N * D)  # MLP, two layer norms
        return params, flops

    stem_params = 3 * 16 * 16 * D + D + D + N * D  # patch conv, class token, learned positions
    stem_flops = 196 * D * 3 * 16 * 16
    tail_params, tail_flops = 2 * D + D * classes + classes, 5 * N * D + D * classes
    (p_mqa, f_mqa), (p_mha, f_mha) = block(kv), block(h)
    params = stem_params + 6 * p_mqa + 6 * p_mha + tail_params
    flops = stem_flops + 6 * f_mqa + 6 * f_mha + tail_flops

    spec = load_spec("vit_tiny_mqa")
    full, derived = _full_and_derived(spec)
    assert full == derived
    assert full["params"] == params == 5_420_968
    assert full["flops"] == flops
    # and the same recipe without the override is timm's ViT-Ti (5,717,416 parameters)
    assert analyze("vit_tiny_patch16_224").params == stem_params + 12 * p_mha + tail_params


def test_gqa_equals_mha_with_repeated_kv_heads():
    """kv_heads = 1 with 2 query heads equals full attention whose two k (and v) heads are copies."""
    spec = load_spec({**TINY, "depth": 1, "attention": {"name": "mhsa", "params": {"kv_heads": 1}}})
    gqa = build_model(spec, seed=0).eval()
    mha = build_model(load_spec({**TINY, "depth": 1}), seed=0).eval()
    D, hd = 32, 16
    sd = gqa.state_dict()
    w, b = sd["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.bias"]  # rows: q (32), k (16), v (16)
    q, k, v = w.split([D, hd, hd])
    qb, kb, vb = b.split([D, hd, hd])
    sd_mha = dict(sd)
    sd_mha["blocks.0.attn.qkv.weight"] = torch.cat([q, k, k, v, v])
    sd_mha["blocks.0.attn.qkv.bias"] = torch.cat([qb, kb, kb, vb, vb])
    mha.load_state_dict(sd_mha)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)
    maps = vitlab.attention_maps(gqa, x)  # the recording path shares kv heads the same way
    assert maps[0].shape == (2, 2, 17, 17)


def test_attend_bias_on_fused_and_recorded_paths():
    attn = build_model(load_spec({**TINY, "depth": 1}), seed=0).blocks[0].attn.eval()
    x = torch.randn(2, 17, 32)
    bias = torch.randn(1, 2, 17, 17)
    state = ForwardState.start((4, 4), 1).replace(attn_bias=bias)
    q, k, v = attn.qkv_heads(x)
    expected = attn.out(torch.softmax(q @ k.transpose(-2, -1) / 16**0.5 + bias, -1) @ v)  # written out
    with torch.no_grad():
        torch.testing.assert_close(attn(x, state), expected, atol=1e-5, rtol=1e-5)
        attn.record_maps = True
        torch.testing.assert_close(attn(x, state), expected, atol=1e-5, rtol=1e-5)


# --- window attention ------------------------------------------------------------------------------

def _window_model(window, **changes):
    spec = {**TINY, "attention": {"name": "window", "params": {"window_size": window}}, **changes}
    return build_model(load_spec(spec), seed=0).eval()


@pytest.mark.parametrize("img, window", [(40, 2), (40, 5), (32, 3)])
def test_window_block_equals_timm_sam_block(img, window):
    """Against timm's SAM ``Block`` (which zero-pads the normed grid to whole windows)."""
    sam = pytest.importorskip("timm.models.vision_transformer_sam")
    model = _window_model(window, img_size=img, depth=1, class_token=False, pool="avg",
                          norm={"name": "layernorm", "params": {"eps": 1e-5}})
    block = model.blocks[0]
    ref = sam.Block(dim=32, num_heads=2, window_size=window).eval()
    ref.load_state_dict(block.state_dict(), strict=True)
    g = img // 8
    x = torch.randn(2, g, g, 32)
    with torch.no_grad():
        out = block(x.reshape(2, g * g, 32), ForwardState.start((g, g), 0))
        torch.testing.assert_close(out, ref(x).reshape(2, g * g, 32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", [{}, {"reg_tokens": 2}, {"class_token": False, "pool": "avg"}])
def test_window_fused_equals_recorded_and_maps_are_block_sparse(prefix):
    model = _window_model(2, **prefix)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
    records = record_attention(model, x)
    P = model.num_prefix_tokens
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    win = (rows // 2) * 2 + cols // 2  # 2x2 windows of the 4x4 grid, written out
    allowed = torch.ones(P + 16, P + 16, dtype=torch.bool)
    allowed[P:, P:] = win[:, None] == win[None, :]
    for r in records:
        assert r.map.shape == (2, 2, P + 16, P + 16) and r.grid == (4, 4) and r.num_prefix == P
        assert (r.map[..., ~allowed] == 0).all()
        torch.testing.assert_close(r.map.sum(-1), torch.ones(2, 2, P + 16))
    for block in model.blocks:
        block.attn.record_maps = True
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_window_covering_the_grid_is_global_attention_and_follows_dynamic_sizes():
    mhsa = build_model(load_spec({**TINY, "reg_tokens": 1}), seed=0).eval()
    window = _window_model(4, reg_tokens=1)
    window.load_state_dict(mhsa.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(window(x), mhsa(x), atol=1e-5, rtol=1e-5)
    dyn = _window_model(2, dynamic_img_size=True)
    with torch.no_grad():
        assert dyn(torch.randn(1, 3, 40, 56)).shape == (1, 10)  # a 5x7 grid, padded to 6x8 windows
    assert [r.grid for r in record_attention(dyn, torch.randn(1, 3, 40, 56))] == [(5, 7), (5, 7)]


def test_window_flops_closed_form():
    """Each patch query meets window² keys plus the prefix; prefix queries meet every token."""
    D, h, hd, n, w, P = 32, 2, 16, 16, 2, 1
    T = n + P
    spec = {**TINY, "depth": 1, "num_classes": 0, "attention": {"name": "window", "params": {"window_size": w}}}
    report = analyze(spec)
    assert report.by_kind["attention"] == 4 * T * D * D + h * 2 * hd * (n * (P + w * w) + P * T)


# --- stages and transitions --------------------------------------------------------------------------

STAGED = {k: v for k, v in TINY.items() if k not in ("depth", "embed_dim", "num_heads")}  # stages imply them


def test_stage_sizes_follow_the_stages():
    spec = load_spec("pit_ti_like")
    assert (spec.depth, spec.embed_dim, spec.num_heads) == (12, 256, 8)
    assert [c.grid_size for c in spec.stage_contexts()] == [(27, 27), (14, 14), (7, 7)]  # (224-16)/8+1, then /2
    with pytest.raises(vitlab.SpecError, match="depth: 5 disagrees with the sum of the stages' depths, 12"):
        load_spec("pit_ti_like", {"depth": 5})
    with pytest.raises(vitlab.SpecError, match="stages.0.transition: the first stage follows the patch embedding"):
        load_spec({**STAGED, "stages": [{"depth": 1, "embed_dim": 32, "num_heads": 2, "transition": "pit_pool"}]})
    with pytest.raises(vitlab.SpecError, match=r"stages\.1\.transition\.name: unknown transition 'pool'"):
        load_spec({**STAGED, "stages": [{"depth": 1, "embed_dim": 32, "num_heads": 2},
                                      {"depth": 1, "embed_dim": 64, "num_heads": 2, "transition": "pool"}]})
    with pytest.raises(vitlab.SpecError, match="pit_pool in stage 1 needs the stage's embed_dim 48 to be a multiple"):
        load_spec({**STAGED, "stages": [{"depth": 1, "embed_dim": 32, "num_heads": 2},
                                      {"depth": 1, "embed_dim": 48, "num_heads": 2}]})
    assert vitlab.ViTSpec.from_yaml(vitlab.dump_spec(spec), registry=spec.registry) == spec


def test_pit_like_tokens_flops_and_maps_per_stage():
    spec = load_spec("pit_ti_like")
    full, derived = _full_and_derived(spec)
    assert full == derived
    assert full["stage_tokens"] == [1 + 27 * 27, 1 + 14 * 14, 1 + 7 * 7] and full["tokens_out"] == 50
    # the transitions' convolutions and prefix maps are counted: (D_out/D_in) taps of 3x3 per output
    t1 = 14 * 14 * 128 * 9 + 64 * 128
    t2 = 7 * 7 * 256 * 9 + 128 * 256
    assert full["by_module"]["transitions"] == t1 + t2 == full["by_kind"]["transition"]
    model = build_model(spec, seed=0).eval()
    records = record_attention(model, torch.randn(1, 3, 224, 224))
    assert [r.map.shape[-1] for r in records] == [730] * 2 + [197] * 6 + [50] * 4
    assert [r.grid for r in records] == [(27, 27)] * 2 + [(14, 14)] * 6 + [(7, 7)] * 4
    assert stages([r.map for r in records]) == [[0, 1], [2, 3, 4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(vitlab.VitlabError, match="roll out one stage at a time"):
        vitlab.attention_rollout([r.map for r in records])
    assert vitlab.attention_rollout([r.map for r in records[8:]]).shape == (1, 50, 50)


def test_patch_merging_stage_and_dynamic_size():
    spec = load_spec({**STAGED, "img_size": 40, "dynamic_img_size": True, "class_token": False, "pool": "avg",
                      "pos_embed": "none", "transition": "patch_merge",
                      "stages": [{"depth": 1, "embed_dim": 32, "num_heads": 2},
                                 {"depth": 1, "embed_dim": 64, "num_heads": 4}]})
    model = build_model(spec, seed=0).eval()
    x = torch.randn(2, 3, 40, 40)  # 5x5 grid -> padded and merged to 3x3
    with torch.no_grad():
        tokens, state = model.forward_tokens(x)
    assert tokens.shape == (2, 9, 64) and state.grid == (3, 3)
    # the merged token of grid cell (0, 0) is reduction(norm(cat of patches (0,0), (1,0), (0,1), (1,1))), timm's order
    with torch.no_grad():
        t0, s0 = model.embed(x)
        t0, _ = model.run_block(0, t0, s0)
        g = t0.reshape(2, 5, 5, 32)
        cat = torch.cat([g[:, 0, 0], g[:, 1, 0], g[:, 0, 1], g[:, 1, 1]], dim=-1)
        merge = model.transitions["1"]
        expected = merge.reduction(merge.norm(cat))
        merged, _ = merge(t0, s0.replace(block_index=None))
    torch.testing.assert_close(merged[:, 0], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert model.forward_tokens(torch.randn(1, 3, 64, 48))[1].grid == (4, 3)
    full, derived = _full_and_derived(spec)
    assert full == derived


# --- CPVT's position generator -------------------------------------------------------------------------

def test_cpvt_generator_runs_after_its_block_only():
    spec = load_spec("vit_tiny_cpvt", {"depth": 3})
    model = build_model(spec, seed=0).eval()
    calls = []
    model.pos_embed.proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
        model(torch.randn(1, 3, 160, 96))  # dynamic size: the generator follows the grid
    assert calls == [(1, 192, 14, 14), (1, 192, 10, 6)]
    full, derived = _full_and_derived(spec)
    assert full == derived
    gen = 196 * 192 * 9  # a depthwise 3x3 over the 14x14 grid, counted once
    assert full["flops"] - analyze("vit_tiny_patch16_224", overrides={"depth": 3, "pos_embed": "none"}).flops == gen


def test_recipes_without_new_fields_build_as_before():
    """The forward state changes no computation: a model equals timm's ViT given its weights
    (timm is the reference), so the 0.1 behaviour is kept."""
    timm = pytest.importorskip("timm")
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                           depth=2).eval()
    model = build_model(load_spec({**TINY, "embed_dim": 192, "num_heads": 3}), seed=0).eval()
    vitlab.load_timm_weights(model, tm.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tm(x), atol=1e-5, rtol=1e-4)


def test_cli_build_and_attention_follow_the_stages(tmp_path):
    from click.testing import CliRunner

    from vitlab.cli import cli, load_commands
    from vitlab.images import procedural_image, save_png

    load_commands()
    runner = CliRunner()
    out = runner.invoke(cli, ["build", "pit_ti_like"])
    assert out.exit_code == 0, out.output
    assert "blocks 2-7: (2, 197, 128) on a 14x14 grid, 4 heads" in " ".join(out.output.split())
    image = tmp_path / "in.png"
    save_png(procedural_image(64, seed=0), image)
    for args, panels in ((["--layer", "all"], 12), (["--rollout"], 1), (["--layer", "-1", "--head", "7"], 1)):
        res = runner.invoke(cli, ["attention", "pit_ti_like", "--image", str(image), "-o", str(tmp_path / "a.png"),
                                  "--force", *args])
        assert res.exit_code == 0, res.output
        assert f"({panels} heatmaps)" in res.output
    # head 7 exists only in the last stage (8 heads); in the first (2 heads) it is refused clearly
    res = runner.invoke(cli, ["attention", "pit_ti_like", "--image", str(image), "-o", str(tmp_path / "b.png"),
                              "--layer", "0", "--head", "7"])
    assert res.exit_code == 2 and "--head 7 is out of range" in res.output
