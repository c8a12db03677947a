"""timm's CaiT family (issue 12: "CaiT's class attention and talking heads"): what it reads as.

A CaiT reads as a two-stage spec: talking-heads self-attention blocks on the patches alone, then a
``class_token`` transition and ``class_attn`` / ``cait_class`` blocks that update only the class
token. Here: that reading, its refusals, the weights' names, a CaiT-like recipe, its attention maps,
and what timm's ``Cait`` cannot hold. References are timm's own models; every timm model is built
with ``pretrained=False``. Coverage, outputs, FLOPs, derived counts and the round trip of the family are checked with every
other family's in ``test_zoo_coverage.py`` and ``test_timm_parity.py``; here, what is its own.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vitlab  # noqa: E402
from vitlab import SpecError, build_model  # noqa: E402
from vitlab.maps import attention_maps, attention_rollout, recording, stages  # noqa: E402
from vitlab.timm_interop import load_timm_weights, spec_from_timm, timm_kwargs, zoo  # noqa: E402
from timm_reference import assert_close, assert_outputs_match_timm, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fast_init")


# --- reading, on the meta device ------------------------------------------------------------------

def test_cait_reads_as_two_stages():
    spec = spec_from_timm(zoo.meta_model("cait_s24_224"))
    assert not spec.class_token and spec.pos_embed.params["include_prefix"] is False
    assert [(st.depth, st.embed_dim, st.num_heads) for st in spec.stages] == [(24, 384, 8), (2, 384, 8)]
    assert spec.stages[1].transition.name == "class_token"
    plans = spec.block_plans()
    assert {p.selections["attention"].name for p in plans[:24]} == {"talking_heads"}
    assert {(p.selections["attention"].name, p.selections["block"].name) for p in plans[24:]} == {
        ("class_attn", "cait_class")}
    assert spec.pool.name == "token" and spec.final_norm


@pytest.mark.parametrize("kw, feature", [
    (dict(depth_token_only=0), "no class-attention blocks"),
    (dict(drop_path_rate=0.1), "stochastic depth at one rate"),
    (dict(proj_drop_rate=0.1), "projection dropout in the self-attention blocks only"),
])
def test_refusals_name_the_feature(kw, feature):
    with pytest.raises(SpecError, match=feature) as info:
        spec_from_timm(zoo.meta_model("cait_xxs24_224", depth=2, **kw))
    assert "timm model 'cait_xxs24_224'" in str(info.value)


# --- timm's weights, loaded -------------------------------------------------------------------------

def test_weights_land_under_vitlab_names():
    """timm's ``blocks_token_only.j`` is block depth + j, its class token the transition's, its
    bare gammas the blocks' layer scales."""
    tm = randomize(timm.create_model("cait_xxs24_224", pretrained=False, depth=2, img_size=32))
    model = build_model(spec_from_timm(tm))
    report = load_timm_weights(model, tm)
    assert report.ok and not report.converted, str(report)
    with torch.no_grad():
        assert torch.equal(model.transitions["1"].cls_token, tm.cls_token)
        assert torch.equal(model.blocks[3].ls2.gamma, tm.blocks_token_only[1].gamma_2)
        assert torch.equal(model.blocks[2].attn.q.weight, tm.blocks_token_only[0].attn.q.weight)
        assert torch.equal(model.blocks[1].attn.proj_l.weight, tm.blocks[1].attn.proj_l.weight)


def test_deit_repository_checkpoint_file_loads(tmp_path):
    """The original CaiT checkpoints (facebookresearch/deit) are timm's names under a ``model`` key."""
    tm = randomize(timm.create_model("cait_xxs24_224", pretrained=False, depth=1, img_size=32)).eval()
    path = tmp_path / "XXS24_224.pth"
    torch.save({"model": tm.state_dict(), "epoch": 399}, path)
    assert_outputs_match_timm(tm, weights=path)


# --- back to timm: what it cannot hold ----------------------------------------------------------------

def test_export_refuses_what_cait_cannot_hold():
    data = spec_from_timm("cait_xxs24_224", depth=1, img_size=32).to_dict()
    with pytest.raises(SpecError, match="has no timm Cait equivalent: attention 'mhsa'"):
        timm_kwargs({**data, "attention": "mhsa"})
    with pytest.raises(SpecError, match="without layer scale"):
        timm_kwargs({**data, "block": {"name": "prenorm", "params": {"init_values": None}}})


# --- a hand-written CaiT-like recipe ---------------------------------------------------------------

RECIPE = {
    "name": "tiny_cait", "img_size": 32, "patch_size": 8, "num_classes": 5, "class_token": False,
    "pos_embed": {"name": "learned", "params": {"include_prefix": False}},
    "attention": "talking_heads",
    "block": {"name": "prenorm", "params": {"init_values": 1e-5}},
    "stages": [{"depth": 2, "embed_dim": 32, "num_heads": 2},
               {"depth": 2, "embed_dim": 32, "num_heads": 2, "transition": "class_token"}],
    "layers": [{"at": "2-3", "attention": "class_attn", "block": {"name": "cait_class", "params": {"init_values": 1e-5}}}],
}


def test_recipe_validates_builds_and_updates_only_the_class_token():
    spec = vitlab.load_spec(RECIPE)
    contexts = spec.stage_contexts()
    assert [c.num_prefix_tokens for c in contexts] == [0, 1] and [c.num_tokens for c in contexts] == [16, 17]
    model = build_model(spec, seed=0).eval()
    assert model.cls_token is None and model.transitions["1"].cls_token.shape == (1, 1, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, state = model.forward_tokens(x)
        assert tokens.shape == (2, 17, 32) and (state.num_prefix, state.num_tokens) == (1, 17)
        assert model(x).shape == (2, 5)
        # a class-attention block leaves every token but the class token as it was
        h = torch.randn(2, 17, 32)
        out = model.blocks[2](h, state.replace(block_index=2))
        assert torch.equal(out[:, 1:], h[:, 1:]) and not torch.equal(out[:, :1], h[:, :1])


@pytest.mark.parametrize("change, message", [
    ({"class_token": True}, "already lead with a class token"),
    ({"stages": [{"depth": 2, "embed_dim": 32, "num_heads": 2}, {"depth": 2, "embed_dim": 64, "num_heads": 2,
                                                                   "transition": "class_token"}]}, "keeps the width"),
    ({"stages": [{"depth": 2, "embed_dim": 32, "num_heads": 2}, {"depth": 2, "embed_dim": 32, "num_heads": 2,
                                                                   "transition": "pit_pool"}]}, "needs a class token"),
])
def test_recipe_refusals(change, message):
    with pytest.raises(SpecError, match=message):
        vitlab.load_spec({**RECIPE, **change})


def test_attention_maps_of_both_stages():
    """Talking heads: the softmax's probabilities, (B, heads, N, N) over the patches; class
    attention: the class token's row, (B, heads, 1, N + 1). Recording leaves outputs as they were;
    rollout composes the square maps and refuses the class token's."""
    model = build_model(vitlab.load_spec(RECIPE), seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, x)
    assert [tuple(m.shape) for m in maps] == [(2, 2, 16, 16)] * 2 + [(2, 2, 1, 17)] * 2
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))
    with torch.no_grad():
        fused = model(x)
        with recording(model):
            recorded = model(x)
    torch.testing.assert_close(recorded, fused, atol=1e-5, rtol=1e-5)
    assert stages(maps) == [[0, 1], [2, 3]]
    assert attention_rollout(maps[:2]).shape == (2, 16, 16)
    with pytest.raises(vitlab.VitlabError, match="square maps"):
        attention_rollout(maps[2:])


def test_class_attention_under_rope_is_self_attentions_class_row():
    """With a q/k position transform (the built-in ``rope``), ``class_attn`` gives what full
    self-attention with its q / k / v weights gives the class token: row 0 of softmax(q kᵀ / √d) v,
    computed here by hand with the transform applied to every token's query and key."""
    import torch.nn.functional as F

    from vitlab import ForwardState, load_spec

    spec = load_spec({"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                      "num_classes": 0, "pos_embed": {"name": "rope"}, "attention": "class_attn",
                      "block": "cait_class"})
    model = build_model(spec, seed=0).eval()
    attn = model.blocks[0].attn
    state = ForwardState.start((4, 4), 1, model.pos_embed)
    assert state.qk_transform is not None
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(5))

    def heads(t):  # (B, N, D) -> (B, 2, N, 16)
        return t.reshape(2, t.shape[1], 2, 16).transpose(1, 2)

    with torch.no_grad():
        q, k = state.transform_qk(heads(attn.q(x)), heads(attn.k(x)))
        probs = F.softmax(q[:, :, :1] @ k.transpose(-2, -1) / 16 ** 0.5, dim=-1)  # (B, 2, 1, N)
        theirs = attn.proj((probs @ heads(attn.v(x))).transpose(1, 2).reshape(2, 1, 32))
        ours = attn(x, state)
    assert_close(ours, theirs)
