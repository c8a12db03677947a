"""The ``vitlab_flop_handles`` hook: plugins declare how their operators are counted, through the
same hook vitlab's built-ins use for fused attention and free operators."""
from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.plugins import make_plugin_manager, use_registry

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 3}


class ExpMlp(vitlab.Mlp):
    """Test-only MLP: fc2(expm1(fc1(x))) -- uses an operator fvcore does not know (aten::expm1)."""

    name = "expmlp"

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        self.fc1 = torch.nn.Linear(ctx.embed_dim, ctx.mlp_hidden_dim, **ctx.factory_kwargs)
        self.fc2 = torch.nn.Linear(ctx.mlp_hidden_dim, ctx.embed_dim, **ctx.factory_kwargs)

    def forward(self, x):
        return self.fc2(torch.expm1(self.fc1(x)))


class ComponentOnly:
    @vitlab.hookimpl
    def vitlab_register_components(self, register):
        register(ExpMlp)


class DeclaresExp(ComponentOnly):
    @vitlab.hookimpl
    def vitlab_flop_handles(self, register):
        register("aten::expm1", flops=lambda inputs, outputs: 7)  # a sentinel count per call


class DeclaresExpAgain:
    @vitlab.hookimpl
    def vitlab_flop_handles(self, register):
        register("aten::expm1", free="elementwise")


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
    assert "aten::expm1" in without.unsupported
    with_rule = _analyze(DeclaresExp())
    assert "aten::expm1" not in with_rule.unsupported
    assert with_rule.flops == without.flops + 7  # one exp call (one block) counted by the declared handle


class ExpPool(vitlab.Pool):
    """Test-only pool: expm1 of the class token (one aten::expm1 outside any MLP)."""

    name = "exppool"

    def forward(self, x):
        return torch.expm1(x[:, 0])


class PoolOnly:
    """Registers ``exppool`` and declares nothing: its exp is counted by whoever counts it globally."""

    @vitlab.hookimpl
    def vitlab_register_components(self, register):
        register(ExpPool)


def _exp_report(*plugins):
    _, registry = make_plugin_manager(entry_points=False, plugins=plugins)
    spec = vitlab.load_spec({**TINY, "depth": 2, "mlp": "expmlp", "pool": "exppool"}, registry=registry)
    return registry, vitlab.analyze(vitlab.build_model(spec, registry=registry, device="meta"), second_opinion=False)


def test_op_declared_twice_is_not_fatal_and_names_both_providers():
    for strict in (True, False):
        _, registry = make_plugin_manager(entry_points=False, plugins=[("a", DeclaresExp()), ("b", DeclaresExpAgain())],
                                          strict=strict)
        assert registry.op_rules["aten::expm1"].provider == "a"  # the first declaration, deterministically
        assert [r.provider for r in registry.op_declarations["aten::expm1"]] == ["a", "b"]
        assert registry.warnings() == [
            "FLOPs of aten::expm1 are declared by 'a' and by 'b': each counts it inside its own components, 'a' everywhere else"
        ]
    _, registry = make_plugin_manager(entry_points=False, plugins=[("c", DeclaresBuiltinOp())])
    assert registry.op_rules["aten::scaled_dot_product_attention"].provider == "vitlab"
    assert registry.warnings() == [
        "FLOPs of aten::scaled_dot_product_attention are declared by 'vitlab' and by 'c': "
        "each counts it inside its own components, 'vitlab' everywhere else"
    ]


def test_each_plugin_counts_the_operator_inside_its_own_components():
    # a declares exp = 7 and owns expmlp; b declares exp free; c owns exppool and declares nothing
    _, first_a = _exp_report(("a", DeclaresExp()), ("b", DeclaresExpAgain()), ("c", PoolOnly()))
    assert first_a.by_operator["aten::expm1"] == 3 * 7  # two blocks' MLPs (a's own) and the pool (a's rule is first)
    assert "aten::expm1" not in first_a.free_ops and "aten::expm1" not in first_a.unsupported
    _, first_b = _exp_report(("b", DeclaresExpAgain()), ("a", DeclaresExp()), ("c", PoolOnly()))
    assert first_b.by_operator["aten::expm1"] == 2 * 7  # a's own MLPs still count 7 each
    assert first_b.free_ops["aten::expm1"] == 1  # the pool's exp follows b's rule, the first one
    assert first_b.flops == first_a.flops - 7


def test_a_plugin_rule_for_a_builtin_op_changes_only_its_own_components():
    _, registry = make_plugin_manager(entry_points=False, plugins=[("c", DeclaresBuiltinOp())])
    with use_registry(registry):
        report = vitlab.analyze(vitlab.load_spec(TINY), second_opinion=False)
    assert report.by_operator["aten::scaled_dot_product_attention"] > 0  # the built-in mhsa: vitlab's rule
    assert "aten::scaled_dot_product_attention" not in report.free_ops


def test_counting_uses_the_registry_the_model_was_built_with():
    _, registry = make_plugin_manager(entry_points=False, plugins=[("p", DeclaresExp())])
    model = vitlab.build_model(vitlab.load_spec({**TINY, "mlp": "expmlp"}, registry=registry), registry=registry, device="meta")
    assert model.registry is registry
    report = vitlab.analyze(model, second_opinion=False)  # the process registry (built-ins only) is active
    assert report.by_operator["aten::expm1"] == 7 and "aten::expm1" not in report.unsupported
    from vitlab.analysis.count import count

    images = torch.empty(1, 3, 32, 32, device="meta")
    builtin_only = count(model.eval(), (images,), second_opinion=False, registry=vitlab.get_registry())
    assert builtin_only.unsupported["aten::expm1"] == 1  # an explicit registry wins


@pytest.mark.parametrize("args, match", [
    (("exp",), "expected a traced name"),
    (("aten::expm1",), "neither a handle nor a reason"),
    (("aten::expm1", {"flops": 3}), "not callable"),
])
def test_malformed_declarations_fail_at_startup(args, match):
    op, kwargs = args[0], (args[1] if len(args) > 1 else {})

    class Bad:
        @vitlab.hookimpl
        def vitlab_flop_handles(self, register):
            register(op, **kwargs)

    with pytest.raises(vitlab.PluginError, match=match):
        make_plugin_manager(entry_points=False, plugins=[("bad", Bad())])
