"""Attention maps, rollout and the `vitlab attention` picture (issue 6)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import vitlab
from vitlab.maps import (AttentionRecord, attention_maps, attention_rollout, nest_matrix, patch_heatmap,
                         record_attention, recording, staged_rollout)
from vitlab.cli import cli, load_commands
from vitlab.component import Attention
from vitlab.images import procedural_image, save_png
from vitlab.plugins import make_plugin_manager

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}


def _model(**changes):
    return vitlab.build_model(vitlab.load_spec({**TINY, **changes}), seed=0).eval()


@pytest.mark.parametrize("changes", [{}, {"reg_tokens": 2}, {"attention": {"name": "mhsa", "params": {"qk_norm": True}}},
                                     {"class_token": False, "pool": "avg"}])
def test_maps_equal_manual_softmax(changes):
    """Each block's map equals softmax(q kᵀ / sqrt(head_dim)) computed here from the same weights."""
    model = _model(**changes)
    x = torch.randn(2, 3, 32, 32)
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: inputs.append(args[0])) for b in model.blocks]
    maps = attention_maps(model, x)
    for h in hooks:
        h.remove()
    N = model.ctx.num_tokens
    assert len(maps) == len(model.blocks)
    for block, inp, got in zip(model.blocks, inputs, maps):
        attn = block.attn
        B = inp.shape[0]
        qkv = attn.qkv(inp).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        expected = torch.softmax(q @ k.transpose(-2, -1) / attn.head_dim**0.5, dim=-1)
        assert got.shape == (2, model.spec.num_heads, N, N)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones(2, model.spec.num_heads, N))


def test_recording_does_not_change_outputs_and_is_off_by_default():
    model = _model(reg_tokens=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        with recording(model):
            recorded = model(x)
    torch.testing.assert_close(recorded, fused, atol=1e-5, rtol=1e-5)
    assert all(not b.attn.record_maps and b.attn.attn_map is None for b in model.blocks)


def test_rollout_matches_hand_computed_example():
    # two layers, one head, two tokens; worked by hand:
    # layer 1: (A1 + I) / 2 = [[.75, .25], [.1, .9]]; layer 2: (A2 + I) / 2 = [[.95, .05], [.2, .8]]
    # rollout = L2 @ L1 = [[.7175, .2825], [.23, .77]]
    a1 = torch.tensor([[0.5, 0.5], [0.2, 0.8]])[None, None]
    a2 = torch.tensor([[0.9, 0.1], [0.4, 0.6]])[None, None]
    got = attention_rollout([a1, a2])
    torch.testing.assert_close(got[0], torch.tensor([[0.7175, 0.2825], [0.23, 0.77]]))


def test_rollout_discard_and_head_fusion():
    # discard 1 of 4 links: the weakest (0.2) goes; (A + I) / 2 = [[.75, .25], [0, .9]] -> rows [[.75, .25], [0, 1]]
    a = torch.tensor([[0.5, 0.5], [0.2, 0.8]])[None, None]
    torch.testing.assert_close(attention_rollout([a], discard_ratio=0.25)[0], torch.tensor([[0.75, 0.25], [0.0, 1.0]]))
    # two heads fused by max / min before the identity is added
    heads = torch.tensor([[[0.5, 0.5], [0.2, 0.8]], [[1.0, 0.0], [0.6, 0.4]]])[None]
    mx = attention_rollout([heads], head_fusion="max")[0]  # max = [[1, .5], [.6, .8]] -> (+I)/2 rows normalised
    torch.testing.assert_close(mx, torch.tensor([[1.0, 0.25], [0.3, 0.9]]) / torch.tensor([[1.25], [1.2]]))
    mn = attention_rollout([heads], head_fusion="min")[0]  # min = [[.5, 0], [.2, .4]]
    torch.testing.assert_close(mn, torch.tensor([[0.75, 0.0], [0.1, 0.7]]) / torch.tensor([[0.75], [0.8]]))
    with pytest.raises(vitlab.VitlabError, match="head_fusion"):
        attention_rollout([heads], head_fusion="median")


def test_nest_matrix_averages_each_cell_and_carries_prefix_tokens():
    # a 3x3 grid merged 2x2 with padding (Swin) into 2x2, one class token: written out by hand
    m = nest_matrix((3, 3), (2, 2), 1)
    want = torch.zeros(5, 10)
    want[0, 0] = 1.0
    cells = {1: [0, 1, 3, 4], 2: [2, 5], 3: [6, 7], 4: [8]}  # output patch -> input patches (row-major)
    for out, ins in cells.items():
        want[out, [1 + i for i in ins]] = 1.0 / len(ins)
    torch.testing.assert_close(m, want)
    assert nest_matrix((5, 5), (4, 4), 0) is None and nest_matrix((4, 4), (4, 4), 0) is None


def test_staged_rollout_joins_stages_through_the_nest():
    """Two stages, 2x2 -> 1x1 without prefix: rollout = R2 @ M @ R1, computed here by hand."""
    a1 = torch.tensor([[0.4, 0.2, 0.2, 0.2], [0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.5, 0.5]])
    r1 = (a1 + torch.eye(4)) / 2  # rows already sum to 1
    records = [AttentionRecord(a1[None, None], (2, 2), 0, 0, 0),
               AttentionRecord(torch.ones(1, 1, 1, 1), (1, 1), 0, 1, 1)]
    rolled, used = staged_rollout(records)
    torch.testing.assert_close(rolled[0], (r1.mean(dim=0, keepdim=True)))  # one token: R2 = 1, M = mean
    assert used == [0, 1]
    records[1] = AttentionRecord(torch.ones(1, 1, 1, 1), None, 0, 1, 1)  # merged off the grid: only the last run
    assert staged_rollout(records)[1] == [1]


def test_swin_rolls_out_through_every_stage_on_the_full_grid():
    """Swin-T at 32 px (8x8 -> 4x4 -> 2x2 -> 1x1; 7x7 windows pad the 8x8 grid): each block's windowed
    map is given back on its full grid, and rollout composes all four stages into (B, 1, 64)."""
    spec = vitlab.load_spec("swin_tiny", {"img_size": 32})
    model = vitlab.build_model(spec).eval()
    records = record_attention(model, torch.randn(1, 3, 32, 32))
    assert [r.map.shape[-1] for r in records] == [64] * 2 + [16] * 2 + [4] * 6 + [1] * 2
    for r in records:  # a row's share that went to the zero padding (as in timm) is not on the image
        sums = r.map.sum(dim=-1)
        assert (sums <= 1 + 1e-5).all() and (sums > 0).all()
    rolled, used = staged_rollout(records)
    assert used == list(range(12)) and rolled.shape == (1, 1, 64)
    torch.testing.assert_close(rolled.sum(dim=-1), torch.ones(1, 1))
    assert patch_heatmap(rolled, records[0].grid, 0, False).shape == (1, 8, 8)


def test_patch_heatmap_uses_class_row_or_mean():
    # 1 prefix token + a 1x2 grid: class row attends [.2, .3, .5] -> patches [.3, .5] -> normalised [0, 1]
    attn = torch.tensor([[[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]]])
    torch.testing.assert_close(patch_heatmap(attn, (1, 2), 1, class_token=True), torch.tensor([[[0.0, 1.0]]]))
    # without a class token: mean received per column over rows = [.2333, .4333, .3333] -> patches [.4333, .3333]
    torch.testing.assert_close(patch_heatmap(attn, (1, 2), 1, class_token=False), torch.tensor([[[1.0, 0.0]]]))


class _NoMatrixAttention(Attention):
    """Test-only attention without a probability matrix (like linear attention)."""

    name = "nomatrix"
    has_maps = False

    def forward(self, x, qk_transform=None):
        return x


class _Plugin:
    @vitlab.hookimpl
    def vitlab_register_components(self, register):
        register(_NoMatrixAttention)


def test_attention_without_matrix_raises_clearly():
    _, registry = make_plugin_manager(entry_points=False, plugins=[("nomatrix", _Plugin())])
    spec = vitlab.load_spec({**TINY, "attention": "nomatrix"}, registry=registry)
    model = vitlab.build_model(spec, registry=registry)
    with pytest.raises(vitlab.VitlabError, match="'nomatrix' computes no attention matrix"):
        attention_maps(model, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("recipe,extra", [("vit_tiny_patch16_224", []), ("vit_tiny_avgpool_reg4", ["--layer", "all"]),
                                          ("vit_tiny_patch16_224", ["--rollout", "--discard-ratio", "0.5"])])
def test_cli_writes_png_and_refuses_overwrite(tmp_path, recipe, extra):
    load_commands()
    image = tmp_path / "in.png"
    save_png(procedural_image(96, seed=3), image)
    out = tmp_path / "att.png"
    runner = CliRunner()
    args = ["attention", recipe, "--image", str(image), "-o", str(out), *extra]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = out.read_bytes()
    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and "already exists" in again.output and out.read_bytes() == before
    assert runner.invoke(cli, args + ["--force"]).exit_code == 0


def test_cli_bad_layer_and_missing_image(tmp_path):
    load_commands()
    image = tmp_path / "in.png"
    save_png(procedural_image(64), image)
    runner = CliRunner()
    r = runner.invoke(cli, ["attention", "vit_tiny_patch16_224", "--image", str(image), "--layer", "12", "-o", str(tmp_path / "o.png")])
    assert r.exit_code == 2 and "out of range" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["attention", "vit_tiny_patch16_224", "--image", str(tmp_path / "none.png"), "-o", str(tmp_path / "o.png")])
    assert r.exit_code == 2 and "image not found" in r.output


def test_cli_loads_vitlab_and_timm_weights(tmp_path):
    """--weights takes a vitlab checkpoint (spec must match) or a timm checkpoint of the recipe."""
    load_commands()
    image = tmp_path / "in.png"
    save_png(procedural_image(64, seed=1), image)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(vitlab.dump_spec(vitlab.load_spec(TINY)))
    model = vitlab.build_model(vitlab.load_spec(TINY), seed=5)
    native = vitlab.save(model, tmp_path / "w.safetensors")
    from safetensors.torch import save_file

    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in vitlab.to_timm_state_dict(model).items()}, str(timm_file))
    runner = CliRunner()
    for weights, label in ((native, "vitlab checkpoint"), (timm_file, "timm checkpoint")):
        out = tmp_path / f"{weights.stem}.png"
        r = runner.invoke(cli, ["attention", str(recipe), "--image", str(image), "--weights", str(weights), "-o", str(out)])
        assert r.exit_code == 0, r.output
        assert out.exists()
    # a vitlab checkpoint of another spec is refused, naming what differs
    other = vitlab.save(vitlab.build_model(vitlab.load_spec({**TINY, "depth": 1}), seed=0), tmp_path / "other.safetensors")
    r = runner.invoke(cli, ["attention", str(recipe), "--image", str(image), "--weights", str(other), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "differs in: depth" in r.output
