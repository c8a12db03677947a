"""FLOPs and parameter reports (issue 3): ``vitlab.analyze`` against independent references.

References come from the closed form of the issue (patch conv ``Np·D·3·p²``, per block
``12·N·D² + 2·N²·D`` for MLP ratio 4, head ``D·classes``, fvcore's LayerNorm ``5·N·D`` each) or from
fvcore run on timm's model with unfused attention -- never from numbers the code under test printed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from vitlab import analyze, build_model, load_spec
from vitlab.analysis import Report
from vitlab.analysis import count as count_mod
from vitlab.analysis.handles import FREE_OPS, NORM_OPS
from vitlab.analysis.report import KIND_KEYS
from vitlab.component import Attention
from vitlab.errors import SpecError, VitlabError
from vitlab.recipes import bundled_recipes

STANDARD = {  # recipe: (D, depth, patch, heads)
    "vit_tiny_patch16_224": (192, 12, 16, 3),
    "vit_small_patch16_224": (384, 12, 16, 6),
    "vit_base_patch16_224": (768, 12, 16, 12),
    "vit_large_patch16_224": (1024, 24, 16, 16),
    "vit_huge_patch14_224": (1280, 32, 14, 16),
}
BUILTIN_RECIPES = sorted(n for n in bundled_recipes() if "/" not in n)  # plugins/ need their plugin
TINY_VARIANTS = [n for n in BUILTIN_RECIPES if n.startswith("vit_tiny")]
BIG = {"vit_22b"}


def closed_form(D: int, depth: int, p: int, img: int = 224, prefix: int = 1, classes: int = 1000,
                norms_per_block: int = 2, final_norm: bool = True) -> dict[str, int]:
    """The issue's closed form, by kind (MLP ratio 4, pre-norm blocks, LayerNorm)."""
    n_patches = (img // p) ** 2
    N = n_patches + prefix
    return {
        "patch_embed": n_patches * D * 3 * p * p,
        "attention": depth * (4 * N * D * D + 2 * N * N * D),  # qkv + proj, q·kᵀ + attn·v
        "mlp": depth * 8 * N * D * D,
        "norm": (norms_per_block * depth + int(final_norm)) * 5 * N * D,
        "head": D * classes,
    }


def _without_method(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("derived", "derivation", "method", "device")}


@pytest.fixture(scope="module")
def timm_unfused():
    """fvcore on timm's model with unfused attention: the figures timm publishes."""
    timm = pytest.importorskip("timm")
    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis

    def run(name: str):
        model = timm.create_model(name, pretrained=False).eval()
        for m in model.modules():
            if isinstance(m, timm.layers.Attention):
                m.fused_attn = False
        x = torch.randn(1, 3, 224, 224)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flops = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            acts = ActivationCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return flops.total(), acts.total(), sum(p.numel() for p in model.parameters())

    return run


# --- the published numbers -------------------------------------------------------------------------------

def test_closed_form_rounds_to_published_figures():
    """The reference itself: ViT-Ti/16 1.26 G and ViT-B/16 17.58 G at 224 px."""
    assert round(sum(closed_form(192, 12, 16).values()) / 1e9, 2) == 1.26
    assert round(sum(closed_form(768, 12, 16).values()) / 1e9, 2) == 17.58


@pytest.mark.parametrize("name", list(STANDARD))
def test_standard_recipes_equal_closed_form(name):
    D, depth, p, _ = STANDARD[name]
    expected = closed_form(D, depth, p)
    report = analyze(name)
    assert report.flops == sum(expected.values())
    for kind in KIND_KEYS:
        assert report.by_kind[kind] == expected.get(kind, 0), kind
    assert sum(report.by_kind.values()) == report.flops
    assert report.tokens == (224 // p) ** 2 + 1
    assert report.unsupported == {}
    assert not report.derived


def test_vit_ti_and_b_published_gflops():
    assert round(analyze("vit_tiny_patch16_224").flops / 1e9, 2) == 1.26
    assert round(analyze("vit_base_patch16_224").flops / 1e9, 2) == 17.58


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224",
                                  pytest.param("vit_base_patch16_224", marks=pytest.mark.slow)])
def test_equals_fvcore_on_timm_unfused(name, timm_unfused):
    flops, acts, params = timm_unfused(name)
    report = analyze(name)
    assert (report.flops, report.activations, report.params) == (flops, acts, params)


def test_plain_fvcore_misses_fused_attention():
    """The problem being fixed: plain fvcore drops 2·N²·D per block on the fused kernel."""
    from fvcore.nn import FlopCountAnalysis

    model = build_model("vit_tiny_patch16_224", seed=0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = FlopCountAnalysis(model, torch.randn(1, 3, 224, 224)).unsupported_ops_warnings(False)
        plain_total = plain.total()
        assert plain.unsupported_ops()["aten::scaled_dot_product_attention"] == 12
    N, D = 197, 192
    assert plain_total == sum(closed_form(D, 12, 16).values()) - 12 * 2 * N * N * D
    assert analyze(model).flops == plain_total + 12 * 2 * N * N * D


# --- fused == unfused, meta == real, nothing unsupported --------------------------------------------------

@contextlib.contextmanager
def unfused(model):
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for m in attns:
        m.record_maps = True
    try:
        yield
    finally:
        for m in attns:
            m.record_maps = False


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_tiny_rmsnorm_qknorm"])
def test_fused_and_unfused_attention_identical(name):
    model = build_model(load_spec(name, {"depth": 3}), seed=0).eval()
    fused = analyze(model)
    with unfused(model):
        explicit = analyze(model)
    assert "aten::scaled_dot_product_attention" in fused.by_operator
    assert "aten::matmul" in explicit.by_operator and "aten::scaled_dot_product_attention" not in explicit.by_operator
    for field in ("flops", "activations", "by_kind", "by_module", "flop_counter", "unsupported"):
        assert getattr(fused, field) == getattr(explicit, field), field


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_meta_count_equals_real_weights(name):
    """Counting on meta tensors (the default) gives what a real CPU model gives."""
    layout = load_spec(name)
    # two blocks keep it fast; a recipe with a per-block layout keeps its depth at a smaller image
    spec = load_spec(name, {"img_size": 64} if layout.layers or layout.stages else {"depth": 2})
    meta = analyze(spec)
    real = analyze(build_model(spec, seed=0))
    assert (meta.device, real.device) == ("meta", "cpu")
    assert _without_method(meta.to_dict()) == _without_method(real.to_dict())


@pytest.mark.parametrize("name", sorted(set(BUILTIN_RECIPES) - BIG))
def test_builtins_leave_nothing_unsupported(name):
    report = analyze(name)
    assert report.unsupported == {}
    assert set(report.free_ops) <= set(FREE_OPS)
    assert report.flops > 0 and sum(report.by_kind.values()) == report.flops


@pytest.mark.parametrize("name", list(STANDARD) + TINY_VARIANTS)
def test_flop_counter_agrees_within_known_differences(name):
    """FlopCounterMode counts 2 per multiply-add and no norms; otherwise the same operators."""
    report = analyze(name)
    norms = sum(v for op, v in report.by_operator.items() if op in NORM_OPS)
    assert report.flop_counter == 2 * (report.flops - norms)


def test_every_norm_is_counted_as_norm():
    """rms_norm (plain fvcore skips it) at 4 per element with weight; q/k norms count as norm."""
    report = analyze("vit_tiny_rmsnorm_qknorm")
    N, D, depth = 197, 192, 12
    assert report.by_kind["norm"] == (2 * depth + 1) * 4 * N * D + 2 * depth * 4 * N * D
    assert report.by_operator["aten::rms_norm"] == report.by_kind["norm"]


def test_kinds_of_variants():
    swiglu = analyze("vit_tiny_swiglu")  # hidden 512: three 192x512 matrices, as two 192x768
    assert swiglu.by_kind["mlp"] == 12 * 3 * 197 * 192 * 512
    reg = analyze("vit_tiny_avgpool_reg4")
    assert reg.tokens == 201 and reg.by_kind["pool"] == 0 and reg.free_ops["aten::mean"] == 1
    linear = analyze("vit_tiny_linear_embed")
    assert linear.by_kind["patch_embed"] == 196 * 192 * 3 * 16 * 16
    scaled = analyze("vit_tiny_patch16_224", overrides={"block.params.init_values": 1e-5})
    assert scaled.flops == analyze("vit_tiny_patch16_224").flops  # layer scale is a free multiply
    assert scaled.by_kind["other"] == 0


# --- sizes, batch, models ------------------------------------------------------------------------------------

def test_img_size_and_batch():
    at384 = analyze("vit_tiny_patch16_224", img_size=384)
    assert at384.flops == sum(closed_form(192, 12, 16, img=384).values())
    assert at384.tokens == 24 * 24 + 1 and at384.img_size == (384, 384)
    one, four = analyze("vit_tiny_patch16_224"), analyze("vit_tiny_patch16_224", batch_size=4)
    assert four.flops == 4 * one.flops and four.activations == 4 * one.activations
    assert four.flop_counter == 4 * one.flop_counter and four.params == one.params
    rect = analyze("vit_tiny_patch16_224", img_size=(160, 224))
    assert rect.tokens == 10 * 14 + 1


def test_model_input_counts_trainable_params():
    model = build_model(load_spec("vit_tiny_patch16_224", {"depth": 2}), seed=0)
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)
    model.train()
    report = analyze(model)
    frozen = sum(p.numel() for p in model.patch_embed.parameters())
    assert report.trainable_params == report.params - frozen
    assert model.training  # restored


def test_dynamic_size_resample_is_counted():
    spec = load_spec("vit_tiny_patch16_224", {"dynamic_img_size": True, "depth": 2})
    report = analyze(build_model(spec, seed=0), img_size=256)
    assert report.unsupported == {}
    assert report.by_kind["pos_embed"] == 16 * 256 * 192  # bicubic: 16 taps per output element
    assert report.tokens == 257


def test_errors():
    with pytest.raises(SpecError):
        analyze("no_such_recipe")
    with pytest.raises(VitlabError):
        analyze("vit_tiny_patch16_224", method="approximate")
    with pytest.raises(VitlabError):
        analyze(build_model(load_spec("vit_tiny_patch16_224", {"depth": 1})), img_size=160)


def test_report_round_trip_and_json():
    report = analyze("vit_tiny_patch16_224")
    data = json.loads(json.dumps(report.to_dict()))
    assert Report.from_dict(data) == report
    for key in ("name", "flops", "params", "trainable_params", "tokens", "activations", "img_size", "batch_size",
                "by_kind", "by_module", "unsupported", "flop_counter", "derived"):
        assert key in data
    assert list(data["by_kind"]) == list(KIND_KEYS)
    assert data["by_module"]["blocks.0"] * 12 == data["by_module"]["blocks"]


# --- derived counts: proven equal to full counts --------------------------------------------------------------

DERIVED_CASES = [
    ("vit_tiny_patch16_224", {}),
    ("vit_tiny_parallel", {"norm.name": "rmsnorm", "attention.params.qk_norm": True, "pool.name": "avg", "reg_tokens": 4}),
    ("vit_tiny_swiglu", {"block.name": "postnorm", "block.params.init_values": 0.1, "drop_path_rate": 0.1}),
    ("vit_22b", {"embed_dim": 192, "num_heads": 3, "depth": 4}),  # the 22B recipe scaled down
]


@pytest.mark.parametrize("name, overrides", DERIVED_CASES)
def test_derived_equals_full(name, overrides):
    full = analyze(name, overrides=overrides, method="full")
    derived = analyze(name, overrides=overrides, method="derived")
    assert derived.derived and "derived" in derived.derivation and not full.derived
    assert _without_method(derived.to_dict()) == _without_method(full.to_dict())


def test_derived_on_a_real_model():
    model = build_model(load_spec("vit_tiny_rmsnorm_qknorm", {"depth": 3}), seed=0).eval()
    full, derived = analyze(model), analyze(model, method="derived")
    assert derived.device == "cpu" and derived.derived
    assert _without_method(derived.to_dict()) == _without_method(full.to_dict())
    assert len(model.blocks) == 3  # the model is left as it was


def test_derived_groups_distinct_blocks():
    """Blocks differing only in drop-path rate are one configuration; a different block is another."""
    from vitlab.analysis.signature import distinct_blocks

    model = build_model(load_spec("vit_tiny_patch16_224", {"depth": 4, "drop_path_rate": 0.2}), device="meta")
    assert distinct_blocks(model.blocks) == [[0, 1, 2, 3]]
    other = build_model(load_spec("vit_tiny_parallel", {"depth": 1}), device="meta").blocks[0]
    model.blocks[2] = other
    assert distinct_blocks(model.blocks) == [[0, 1, 3], [2]]
    full, derived = analyze(model, method="full"), analyze(model, method="derived")
    assert "2 distinct" in derived.derivation
    assert _without_method(derived.to_dict()) == _without_method(full.to_dict())


@contextlib.contextmanager
def _no_meta_convolutions():
    yield  # the meta convolution then fails to trace: forces the real-weights fallback


@pytest.mark.parametrize("limit, method", [(2**40, "full"), (0, "derived")])
def test_real_weights_fallback(monkeypatch, limit, method):
    """When meta tensors fail, small models are counted in full and big ones derived, on CPU."""
    import vitlab.analysis as analysis

    overrides = {"embed_dim": 192, "num_heads": 3, "depth": 3}
    reference = analyze("vit_22b", overrides=overrides)
    monkeypatch.setattr(count_mod, "meta_convolutions", _no_meta_convolutions)
    monkeypatch.setattr(analysis, "REAL_WEIGHTS_LIMIT", limit)
    report = analyze("vit_22b", overrides=overrides)
    assert (report.device, report.method) == ("cpu", method)
    assert _without_method(report.to_dict()) == _without_method(reference.to_dict())


def test_full_count_refused_when_too_big_for_real_weights(monkeypatch):
    import vitlab.analysis as analysis

    monkeypatch.setattr(count_mod, "meta_convolutions", _no_meta_convolutions)
    monkeypatch.setattr(analysis, "REAL_WEIGHTS_LIMIT", 0)
    with pytest.raises(VitlabError, match="derived"):
        analyze("vit_tiny_patch16_224", overrides={"depth": 1}, method="full")


# --- ViT-22B ---------------------------------------------------------------------------------------------------

def _vit22b_params(D=6144, depth=48, p=14, hd=128, classes=1000) -> int:
    n_patches = (224 // p) ** 2
    block = (2 * D  # shared LayerNorm of the parallel block
             + 3 * D * D  # qkv, no bias
             + 2 * 2 * hd  # q_norm, k_norm over head_dim
             + D * D + D  # proj
             + D * 4 * D + 4 * D + 4 * D * D + D)  # fc1, fc2
    return (3 * p * p * D + D) + n_patches * D + depth * block + 2 * D + D * classes + classes


@pytest.mark.slow
def test_vit22b_counts():
    """21.76 B parameters exact; FLOPs within 0.5% of the closed form; < 8 GiB and < 60 s."""
    script = textwrap.dedent("""
        import json, time
        t = time.perf_counter()
        import vitlab
        r = vitlab.analyze("vit_22b")
        print(json.dumps({"params": r.params, "flops": r.flops, "by_kind": r.by_kind, "derived": r.derived,
                          "seconds": time.perf_counter() - t,
                          # VmHWM: this address space's peak (ru_maxrss survives execve: the parent's)
                          "peak_gib": next(int(line.split()[1]) for line in open("/proc/self/status")
                                           if line.startswith("VmHWM:")) / 2**20}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["params"] == _vit22b_params() == 21_757_004_776
    N, D = 256, 6144
    expected = closed_form(D, 48, 14, prefix=0, norms_per_block=1)
    expected["norm"] += 48 * 2 * 5 * N * D  # q_norm and k_norm: LayerNorm over every (head, token)
    assert abs(got["flops"] - sum(expected.values())) <= 0.005 * sum(expected.values())
    assert got["by_kind"]["attention"] == expected["attention"]
    assert got["peak_gib"] < 8 and got["seconds"] < 60


def test_logging_quiet(caplog):
    """Counting does not spray fvcore's unsupported-operator warnings."""
    with caplog.at_level(logging.WARNING):
        analyze("vit_tiny_patch16_224", overrides={"depth": 1})
    assert not [r for r in caplog.records if "Unsupported operator" in r.getMessage()]


# import stays light, analyze is a lazy export: test_import.py
