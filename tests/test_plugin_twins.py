"""A plugin's timm twin (``vitlab_timm_equivalents``) claims its own class and its own keys only.

The threats: a plugin that declares ``timm_type=object``, or an ABC whose ``__subclasshook__`` timm's
``Attention`` satisfies, would be read in place of timm's attention in every model; a plugin's
state-dict renames would change the load of models that never use its component. The references
are timm's own models and their outputs.
"""
from __future__ import annotations

import abc

import pytest
import torch
from torch import nn

import vitlab
from vitlab.components.attention import MultiHeadSelfAttention

timm = pytest.importorskip("timm")
from timm.layers import Attention as TimmAttention  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


class OutProjAttention(MultiHeadSelfAttention):
    """mhsa that keeps its output projection as ``out_proj`` (another project's names)."""

    name = "mhsa_outproj"

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        self.out_proj = self._modules.pop("proj")

    def out(self, x):
        B, _, N, _ = x.shape  # (B, heads, N, head_dim) -> (B, N, D)
        return self.proj_drop(self.out_proj(x.transpose(1, 2).reshape(B, N, -1)))


class OutProjTwin(TimmAttention):
    """The plugin's own timm module for it: timm's Attention, timm's names (``proj``)."""


def _read(m):
    return {"qkv_bias": m.qkv.bias is not None}


def _plugin(timm_type=OutProjTwin, renames=(("blocks.{block}.attn.proj.{rest}", "blocks.{block}.attn.out_proj.{rest}"),)):
    class Plugin:
        @vitlab.hookimpl
        def vitlab_register_components(register):
            register(OutProjAttention)

        @vitlab.hookimpl
        def vitlab_timm_equivalents(register):
            register(vitlab.TimmEquivalent(kind="attention", name="mhsa_outproj", timm_type=timm_type, read=_read,
                                           layer=lambda p: OutProjTwin, renames=tuple(renames)))

    return Plugin


def _registry(plugin):
    return vitlab.make_plugin_manager(entry_points=False, plugins=[("twins", plugin)], strict=False)[1]


def _timm_vit():
    torch.manual_seed(0)
    return TimmViT(**TINY).eval()


# --- which classes a twin may claim ------------------------------------------------------------------

class _HasQKV(abc.ABC):
    """An ABC every torch module "is an instance of" (timm's Attention too)."""

    @classmethod
    def __subclasshook__(cls, C):
        return True if issubclass(C, nn.Module) else NotImplemented


class _AbstractTwin(nn.Module, abc.ABC):
    @abc.abstractmethod
    def forward(self, x): ...


@pytest.mark.parametrize("timm_type, why", [
    (object, "the plugin's own class, not builtins.object"),
    (_HasQKV, "metaclass ABCMeta"),
    (_AbstractTwin, "metaclass ABCMeta"),
    (TimmAttention, "the plugin's own class, not timm"),
    (nn.Linear, "the plugin's own class, not torch"),
    (int, "the plugin's own class, not builtins.int"),
    (dict, "the plugin's own class"),
], ids=["object", "abc-subclasshook", "abstract", "timm-attention", "torch-linear", "int", "dict"])
def test_a_twin_must_be_a_concrete_module_class_of_the_plugin(timm_type, why):
    registry = _registry(_plugin(timm_type=timm_type))
    (failure,) = registry.failures
    assert why in failure.message() and "twins" in failure.message()
    assert ("attention", "mhsa_outproj") not in registry and not registry.timm_equivalents


def test_a_twin_from_another_package_is_refused():
    """Claiming another package's concrete module (here torchvision's) is claiming what is not yours."""
    from torchvision.ops.misc import MLP

    registry = _registry(_plugin(timm_type=MLP))
    (failure,) = registry.failures
    assert "the plugin's own class (from 'test_plugin_twins'" in failure.message() or \
           "the plugin's own class (from 'tests'" in failure.message()
    assert not registry.timm_equivalents


def test_an_abc_twin_does_not_take_over_timm_attention():
    """The ABC is refused at load, so timm's plain ViT still reads as mhsa: matching is by exact class."""
    assert isinstance(TimmAttention(32, num_heads=2), _HasQKV)  # the threat is real
    registry = _registry(_plugin(timm_type=_HasQKV))
    with vitlab.use_registry(registry):
        spec = vitlab.spec_from_timm(_timm_vit())
    assert spec.attention.name == "mhsa"


def test_a_subclass_of_the_twin_is_not_the_twin():
    """Exact class: a module merely derived from the plugin's twin is not read as its component."""
    from vitlab.timm_interop.equivalents import twin_of

    registry = _registry(_plugin())
    assert not registry.failures
    Sub = type("Sub", (OutProjTwin,), {})
    twin = OutProjTwin(32, num_heads=2, qkv_bias=True)
    assert twin_of(registry, "attention", twin).name == "mhsa_outproj"
    assert twin_of(registry, "attention", Sub(32, num_heads=2, qkv_bias=True)) is None
    assert twin_of(registry, "attention", TimmAttention(32, num_heads=2)) is None
    assert twin_of(registry, "mlp", twin) is None


# --- whose keys a twin's renames touch ---------------------------------------------------------------

def test_renames_outside_the_component_module_are_refused():
    registry = _registry(_plugin(renames=[("blocks.{block}.norm1.{rest}", "blocks.{block}.attn.norm1.{rest}")]))
    (failure,) = registry.failures
    assert "not under the component's module 'blocks.{block}.attn'" in failure.message()


def test_a_plugin_with_renames_leaves_a_plain_vit_load_alone():
    """Before, a plain ViT load failed once a plugin declared renames (``proj`` became ``out_proj``)."""
    registry = _registry(_plugin())
    tm = _timm_vit()
    with vitlab.use_registry(registry):
        model = vitlab.build_model(vitlab.load_spec(TINY), seed=1).eval()
        report = vitlab.load_timm_weights(model, tm)
    assert report.ok
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), tm(x))


def test_renames_apply_to_the_blocks_using_the_component_only():
    """Block 1 uses the plugin's attention, block 0 mhsa: timm's plain ViT weights load into both
    (``proj`` renamed for block 1 only), and the outputs are timm's."""
    registry = _registry(_plugin())
    tm = _timm_vit()
    with vitlab.use_registry(registry):
        spec = vitlab.load_spec({**TINY, "layers": [{"at": 1, "attention": "mhsa_outproj"}]})
        model = vitlab.build_model(spec, seed=1).eval()
        assert "blocks.1.attn.out_proj.weight" in model.state_dict() and "blocks.0.attn.proj.weight" in model.state_dict()
        report = vitlab.load_timm_weights(model, tm)
    assert report.ok, report.lines()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tm(x), rtol=0, atol=1e-6)


def test_the_twin_round_trips_through_timm_with_its_renames():
    """All blocks use it: timm's VisionTransformer is built with the plugin's twin in every block,
    and vitlab's weights go there and back under the declared names."""
    from vitlab.timm_interop import timm_class, timm_kwargs, to_timm_state_dict

    registry = _registry(_plugin())
    with vitlab.use_registry(registry):
        spec = vitlab.load_spec({**TINY, "attention": "mhsa_outproj"})
        model = vitlab.build_model(spec, seed=2).eval()
        tm = timm_class(spec)(**timm_kwargs(spec)).eval()
        assert all(type(b.attn) is OutProjTwin for b in tm.blocks)
        tm.load_state_dict(to_timm_state_dict(model), strict=True)
        again = vitlab.build_model(spec, seed=3).eval()
        assert vitlab.load_timm_weights(again, tm).ok
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tm(x), rtol=0, atol=1e-6)
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("returned", [[("qkv_bias", True)], None, "qkv_bias", {1: True}])
def test_a_twin_whose_read_returns_no_mapping_is_refused_naming_the_plugin(returned):
    """Before, a list from ``read()`` crashed ``from-timm`` with an internal error."""
    class Plugin(_plugin()):
        @vitlab.hookimpl
        def vitlab_timm_equivalents(register):
            register(vitlab.TimmEquivalent(kind="attention", name="mhsa_outproj", timm_type=OutProjTwin,
                                           read=lambda m: returned, layer=lambda p: OutProjTwin))

    registry = _registry(Plugin)
    assert not registry.failures
    tm = TimmViT(**TINY, attn_layer=OutProjTwin)
    with vitlab.use_registry(registry):
        with pytest.raises(vitlab.SpecError) as err:
            vitlab.spec_from_timm(tm)
    text = "\n".join(err.value.lines())
    assert "plugin 'twins'" in text and "not a mapping of param names" in text
