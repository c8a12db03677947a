"""The plugin guide's worked token-merging example (docs/plugins.md, "A block that merges tokens"):
a ToMe-style block (Bolya et al. 2023) written as a plugin, with derived == full FLOPs, the real
token counts and per-block attention maps.

References: the token counts follow ToMe's schedule (r fewer per block, computed here); the
FLOPs of a merging block are checked against a written-out closed form of its matmuls.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

import vitlab
from vitlab.maps import record_attention

pytestmark = pytest.mark.usefixtures("single_thread")


# --- the plugin, as docs/plugins.md shows it ----------------------------------------------------------

def bipartite_merge(x: torch.Tensor, size: torch.Tensor, r: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching: split the patch tokens into alternate sets A and B, merge
    the r tokens of A most similar to B into their match (size-weighted means). Prefix tokens stay.

    Args: x (B, P + N, D); size (B, P + N, 1) how many patches each token stands for.
    Returns: x (B, P + N - r, D) and its sizes.
    """
    prefix, a, b = x[:, :P], x[:, P::2], x[:, P + 1::2]
    sp, sa, sb = size[:, :P], size[:, P::2], size[:, P + 1::2]
    scores = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)  # (B, Na, Nb)
    best, match = scores.max(dim=-1)  # each token of A: its most similar token of B
    order = best.argsort(dim=-1, descending=True)
    src, keep = order[:, :r], order[:, r:]  # the r best-matched A tokens merge, the rest stay
    D = x.shape[-1]
    dst = match.gather(1, src)  # (B, r): where each merged token goes
    wa = a * sa  # size-weighted sums, divided by the summed sizes below
    wb = (b * sb).scatter_add(1, dst[..., None].expand(-1, -1, D), wa.gather(1, src[..., None].expand(-1, -1, D)))
    sb = sb.scatter_add(1, dst[..., None], sa.gather(1, src[..., None]))
    kept_a, kept_sa = wa.gather(1, keep[..., None].expand(-1, -1, D)), sa.gather(1, keep[..., None])
    sizes = torch.cat([sp, kept_sa, sb], dim=1)
    return torch.cat([prefix, kept_a / kept_sa, wb / sb], dim=1), sizes


class MergingBlock(vitlab.Block):
    """Pre-norm block that merges ``r`` tokens after attention, with proportional attention."""

    name = "tome"

    class Params(vitlab.Block.Params):
        r: int = Field(8, ge=0, description="tokens merged away by this block")

    def __init__(self, ctx: vitlab.BuildContext, params: Params):
        super().__init__(ctx, params)
        self.r = params.r
        self.norm1, self.attn = ctx.make("norm"), ctx.make("attention")
        self.norm2, self.mlp = ctx.make("norm"), ctx.make("mlp")
        self.drop_path1, self.drop_path2 = vitlab.drop_path(ctx.drop_path), vitlab.drop_path(ctx.drop_path)

    def forward(self, x: torch.Tensor, state: vitlab.ForwardState):
        B, T, _ = x.shape
        size = state.token_weights
        size = x.new_ones(B, T, 1) if size is None else size[..., None]
        # proportional attention: a token standing for s patches counts s times (log s bias),
        # added to the position encoding's own bias (relpos_mlp), not replacing it
        attn_state = state.add_attn_bias(size.log().transpose(1, 2)[:, None])  # (B, 1, 1, T)
        x = x + self.drop_path1(self.attn(self.norm1(x), attn_state))
        r = min(self.r, (T - state.num_prefix) // 2)
        if r:
            x, size = bipartite_merge(x, size, r, state.num_prefix)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        # merged tokens leave the patch grid: what needs it (RoPE or a relative bias in later
        # blocks, window attention) refuses, naming this block
        return x, state.regrid(None, num_tokens=x.shape[1], token_weights=size[..., 0])


class _Plugin:
    @staticmethod
    @vitlab.hookimpl
    def vitlab_register_components(register):
        register(MergingBlock)


REGISTRY = vitlab.make_plugin_manager(entry_points=False, plugins=[("tome", _Plugin)])[1]
RECIPE = {"extends": "vit_tiny_patch16_224", "name": "vit_tiny_tome", "depth": 4,
          "block": {"name": "tome", "params": {"r": 16}}}


# --- tests --------------------------------------------------------------------------------------------

def test_tokens_follow_the_merging_schedule_and_counts_agree():
    spec = vitlab.load_spec(RECIPE, registry=REGISTRY)
    with vitlab.use_registry(REGISTRY):
        full = vitlab.analyze(spec, method="full", second_opinion=False)
        derived = vitlab.analyze(spec, method="derived", second_opinion=False)
    assert full.flops == derived.flops and full.by_module == derived.by_module
    assert full.activations == derived.activations and full.unsupported == derived.unsupported
    assert full.tokens == 197 and full.tokens_out == 197 - 4 * 16  # ToMe's schedule: r fewer per block
    assert full.tokens_text() == "197→133"
    # each block's attention runs on its own N: q·kᵀ and attn·v are 2·h·N²·hd multiply-adds
    h, hd = 3, 64
    attention_core = [2 * h * n * n * hd for n in (197, 181, 165, 149)]
    plain = vitlab.analyze("vit_tiny_patch16_224", overrides={"depth": 1}, second_opinion=False)
    assert full.by_operator["aten::scaled_dot_product_attention"] == sum(attention_core)
    assert plain.by_operator["aten::scaled_dot_product_attention"] == attention_core[0]


def test_merged_means_are_size_weighted():
    # prefix, then patches alternating A, B: a0=[1,0], b0=[2,0], a1=[0,1], b1=[1,1]
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0]]])  # b0 already stands for 3 patches
    out, sizes = bipartite_merge(x, size, 1, 1)
    # a0 matches b0 exactly in direction (cosine 1 > a1·b1's 0.71): it merges into b0, weighted 1:3
    assert sizes[0, :, 0].tolist() == [1.0, 1.0, 4.0, 1.0]
    torch.testing.assert_close(out[0], torch.tensor([[5.0, 5.0], [0.0, 1.0], [(1.0 + 3 * 2.0) / 4, 0.0], [1.0, 1.0]]))


def test_maps_have_each_blocks_own_token_count():
    spec = vitlab.load_spec(RECIPE, registry=REGISTRY)
    model = vitlab.build_model(spec, seed=0, registry=REGISTRY).eval()
    records = record_attention(model, torch.randn(1, 3, 224, 224))
    assert [r.map.shape[-1] for r in records] == [197, 181, 165, 149]
    assert [r.grid for r in records] == [(14, 14), None, None, None]  # merged tokens left the grid
    for r in records:
        torch.testing.assert_close(r.map.sum(-1), torch.ones_like(r.map.sum(-1)))
    with pytest.raises(vitlab.VitlabError, match="roll out one stage at a time"):
        vitlab.attention_rollout([r.map for r in records])


def test_grid_dependent_positions_refuse_merged_tokens_clearly():
    spec = vitlab.load_spec({**RECIPE, "attention": {"name": "window", "params": {"window_size": 7}}},
                            registry=REGISTRY)
    model = vitlab.build_model(spec, seed=0, registry=REGISTRY).eval()
    with pytest.raises(ValueError, match="window attention \\(block 1\\) needs tokens on a patch grid"):
        model(torch.randn(1, 3, 224, 224))


def test_the_plugin_guide_shows_this_code():
    """docs/plugins.md quotes this file's plugin: the two must not drift apart."""
    import inspect
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    for obj in (bipartite_merge, MergingBlock):
        assert inspect.getsource(obj).strip() in guide, obj.__name__
