"""Block orderings: both residual branches must reach the output.

The notebook this project grew out of had a block whose forward computed attention and then
threw it away::

    attn_out = self.attn(self.norm1(x))
    x = x + self.mlp(self.norm2(x))      # attn_out never added: the model is an MLP per token

It trained and produced the right shapes, so shape tests did not catch it. ``branch_problems``
below does: zeroing either branch must change the block's output, and the output must have a
non-zero gradient with respect to both branches' output projections. ``test_check_flags_the_
notebook_bug`` proves the check fails on that buggy block.
"""
from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab import build_model, load_spec

from vitlab.state import ForwardState

from conftest import TINY, TINY_PATCHES, repo_registry

pytestmark = pytest.mark.usefixtures("single_thread")

REGISTRY = repo_registry()
BLOCKS = [i.name for i in REGISTRY.components("block")]
# blocks with no attention and MLP branches to check, and what checks them instead
NO_BRANCHES = {"mbconv": "TinyViT's conv stage, an inverted residual: equal to timm's ConvLayer (test_tiny_vit.py)"}
CASES = [(name, {}) for name in BLOCKS if name not in NO_BRANCHES] + [("parallel", {"shared_norm": False})]
N = 1 + TINY_PATCHES
# what the model hands its blocks for TINY: a 4 x 4 grid after one class token
STATE = ForwardState.start((4, 4), 1)
# blocks that take no class token (gcvit's prefix tokens are its global queries): the patches alone
NO_PREFIX = {"gcvit"}


def make_block(name: str, params: dict | None = None, registry=REGISTRY):
    alone = {"class_token": False, "pool": "avg"} if name in NO_PREFIX else {}
    spec = load_spec({**TINY, **alone, "depth": 1, "block": {"name": name, "params": params or {}}}, registry=registry)
    return build_model(spec, seed=0, registry=registry).blocks[0].eval()


def _zeros(x, *args, **kwargs):
    return torch.zeros_like(x)


def _tokens(out):
    return out[0] if isinstance(out, tuple) else out  # a block may hand back (tokens, new state)


def branch_problems(block: torch.nn.Module, x: torch.Tensor, state: ForwardState = STATE) -> list[str]:
    """Why ``block`` fails to add both residual branches to its output (empty: it does)."""
    problems = []
    with torch.no_grad():
        ref = _tokens(block(x, state))
        for branch in ("attn", "mlp"):
            module = getattr(block, branch)
            module.forward = _zeros  # instance attribute shadows the class's forward
            try:
                out = _tokens(block(x, state))
            finally:
                del module.forward
            if torch.allclose(out, ref, atol=1e-6, rtol=0):
                problems.append(f"replacing the {branch} output by zeros does not change the block output")
    block.zero_grad(set_to_none=True)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    # a random projection: sum(out) alone can have zero gradient through a final LayerNorm
    (_tokens(block(x, state)) * weights).sum().backward()
    for pname in ("attn.proj.weight", "mlp.fc2.weight"):
        grad = block.get_parameter(pname).grad
        if grad is None or not grad.abs().max() > 0:
            problems.append(f"d(out)/d({pname}) is zero")
    return problems


@pytest.fixture
def tokens():
    return torch.randn(2, N, 32, generator=torch.Generator().manual_seed(3))


def test_registry_has_the_documented_orderings():
    assert {"prenorm", "postnorm", "respostnorm", "parallel"} <= set(BLOCKS)


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}{'-' + str(p) if p else ''}" for n, p in CASES])
def test_both_branches_contribute(name, params, tokens):
    if name in NO_PREFIX:
        assert branch_problems(make_block(name, params), tokens[:, 1:], ForwardState.start((4, 4), 0)) == []
    else:
        assert branch_problems(make_block(name, params), tokens) == []


# --- the check must catch the notebook bug --------------------------------------------------


class NotebookBlock(vitlab.Block):
    """The notebook's block: attention computed, then discarded."""

    name = "notebook_bug"

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        self.norm1, self.attn = ctx.make("norm"), ctx.make("attention")
        self.norm2, self.mlp = ctx.make("norm"), ctx.make("mlp")

    def forward(self, x, state):
        attn_out = self.attn(self.norm1(x), state)  # noqa: F841  (the bug: never added)
        x = x + self.mlp(self.norm2(x))
        return x


class NoMlpBlock(NotebookBlock):
    """The mirror image: the MLP branch is dropped."""

    name = "no_mlp_bug"

    def forward(self, x, state):
        x = x + self.attn(self.norm1(x), state)
        self.mlp(self.norm2(x))
        return x


class _BuggyPlugin:
    @staticmethod
    @vitlab.hookimpl
    def vitlab_register_components(register):
        register(NotebookBlock)
        register(NoMlpBlock)


def test_check_flags_the_notebook_bug(tokens):
    _, registry = vitlab.make_plugin_manager(entry_points=False, plugins=[("buggy", _BuggyPlugin)])
    problems = branch_problems(make_block("notebook_bug", registry=registry), tokens)
    assert problems == [
        "replacing the attn output by zeros does not change the block output",
        "d(out)/d(attn.proj.weight) is zero",
    ]
    problems = branch_problems(make_block("no_mlp_bug", registry=registry), tokens)
    assert problems == [
        "replacing the mlp output by zeros does not change the block output",
        "d(out)/d(mlp.fc2.weight) is zero",
    ]


# --- each ordering computes its documented formula -------------------------------------------


def _formula(name, b, x):
    a = lambda h: b.attn(h, STATE)  # noqa: E731
    if name == "prenorm":  # Dosovitskiy et al. 2021, eq. 2-3
        x = x + a(b.norm1(x))
        return x + b.mlp(b.norm2(x))
    if name == "postnorm":  # Vaswani et al. 2017
        x = b.norm1(x + a(x))
        return b.norm2(x + b.mlp(x))
    if name == "respostnorm":  # Swin V2
        x = x + b.norm1(a(x))
        return x + b.norm2(b.mlp(x))
    if name == "parallel":  # ViT-22B / GPT-J: one shared norm
        h = b.norm1(x)
        return x + a(h) + b.mlp(h)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["prenorm", "postnorm", "respostnorm", "parallel"])
def test_block_formula(name, tokens):
    block = make_block(name)
    with torch.no_grad():
        # give the norms non-trivial affine parameters so misplaced norms show
        for mod in block.modules():
            if isinstance(mod, vitlab.Norm):
                mod.weight.uniform_(0.5, 1.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.uniform_(-0.5, 0.5)
        torch.testing.assert_close(block(tokens, STATE), _formula(name, block, tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, timm_cls", [("prenorm", "Block"), ("respostnorm", "ResPostBlock")])
def test_block_matches_timm(name, timm_cls, tokens):
    vt = pytest.importorskip("timm.models.vision_transformer")
    block = make_block(name, {"init_values": 0.5} if name == "prenorm" else {})
    ref = getattr(vt, timm_cls)(dim=32, num_heads=2, qkv_bias=True, init_values=0.5 if name == "prenorm" else None).eval()
    ref.load_state_dict(block.state_dict(), strict=True)  # same parameter names, all weights copied
    with torch.no_grad():
        torch.testing.assert_close(block(tokens, STATE), ref(tokens), atol=1e-5, rtol=0)
