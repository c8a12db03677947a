"""The ``vitlab_flop_handles`` hook: plugins declare how their operators are counted, through the
same hook vitlab's built-ins use for fused attention and free operators."""
from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.plugins import make_plugin_manager, use_registry

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 3}


class ExpMlp(vitlab.Mlp):
    """Test-only MLP: fc2(exp(fc1(x))) -- uses an operator fvcore does not know (aten::exp)."""

    name = "expmlp"

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        self.fc1 = torch.nn.Linear(ctx.embed_dim, ctx.mlp_hidden_dim, **ctx.factory_kwargs)
        self.fc2 = torch.nn.Linear(ctx.mlp_hidden_dim, ctx.embed_dim, **ctx.factory_kwargs)

    def forward(self, x):
        return self.fc2(torch.exp(self.fc1(x)))


class ComponentOnly:
    @vitlab.hookimpl
    def vitlab_register_components(self, register):
        register(ExpMlp)


class DeclaresExp(ComponentOnly):
    @vitlab.hookimpl
    def vitlab_flop_handles(self, register):
        register("aten::exp", flops=lambda inputs, outputs: 7)  # a sentinel count per call


class DeclaresExpAgain:
    @vitlab.hookimpl
    def vitlab_flop_handles(self, register):
        register("aten::exp", free="elementwise")


class DeclaresBuiltinOp:
    @vitlab.hookimpl
    def vitlab_flop_handles(self, register):
        register("aten::scaled_dot_product_attention", free="nothing")


def _analyze(plugin):
    _, registry = make_plugin_manager(entry_points=False, plugins=[("p", plugin)])
    with use_registry(registry):
        spec = vitlab.load_spec({**TINY, "mlp": "expmlp"})
        return vitlab.analyze(spec)


def test_builtins_declare_their_ops_through_the_hook():
    _, registry = make_plugin_manager(entry_points=False)
    assert registry.op_rules["aten::scaled_dot_product_attention"].provider == "vitlab"
    assert registry.op_rules["aten::gelu"].free


def test_undeclared_op_is_unsupported_and_declared_op_is_counted():
    without = _analyze(ComponentOnly())
    assert "aten::exp" in without.unsupported
    with_rule = _analyze(DeclaresExp())
    assert "aten::exp" not in with_rule.unsupported
    assert with_rule.flops == without.flops + 7  # one exp call (one block) counted by the declared handle


def test_op_declared_twice_names_both_providers():
    with pytest.raises(vitlab.PluginError, match="aten::exp are declared twice: by 'a' and by 'b'"):
        make_plugin_manager(entry_points=False, plugins=[("a", DeclaresExp()), ("b", DeclaresExpAgain())])
    with pytest.raises(vitlab.PluginError, match="declared twice: by 'vitlab' and by 'c'"):
        make_plugin_manager(entry_points=False, plugins=[("c", DeclaresBuiltinOp())])


@pytest.mark.parametrize("args, match", [
    (("exp",), "expected a traced name"),
    (("aten::exp",), "neither a handle nor a reason"),
    (("aten::exp", {"flops": 3}), "not callable"),
])
def test_malformed_declarations_fail_at_startup(args, match):
    op, kwargs = args[0], (args[1] if len(args) > 1 else {})

    class Bad:
        @vitlab.hookimpl
        def vitlab_flop_handles(self, register):
            register(op, **kwargs)

    with pytest.raises(vitlab.PluginError, match=match):
        make_plugin_manager(entry_points=False, plugins=[("bad", Bad())])
