"""Every count stays on meta: ``analyze(method="full")`` of a recipe never falls back to real weights
for a component that can run on meta tensors (``Report.device == "meta"``). Attention pooling
(``pool: map``, every SigLIP) used to: ``FlopCounterMode``'s second opinion raised "Expected gradient
function to be set" on meta, and the count moved to real zero weights on the CPU (~20x slower;
refused above 2 GiB of weights, ``vit_giantopt_patch16_siglip_384``).

One timm model per family and feature here; ``benchmarks/zoo_meta_counts.py`` counts the whole zoo.
"""
from __future__ import annotations

import pytest

from vitlab import analyze, build_model, load_spec

MAP_POOL = {"pool.name": "map", "depth": 2}


def test_attention_pooling_counts_on_meta_as_on_real_weights():
    meta = analyze("vit_tiny_patch16_224", overrides=MAP_POOL, method="full")
    assert meta.device == "meta" and meta.method == "full"
    model = build_model(load_spec("vit_tiny_patch16_224", MAP_POOL), seed=0).eval()
    real = analyze(model, method="full")
    assert real.device == "cpu"
    assert (meta.flops, meta.flop_counter, meta.by_module, meta.activations) == (
        real.flops, real.flop_counter, real.by_module, real.activations)
    assert analyze("vit_tiny_patch16_224", overrides=MAP_POOL, method="derived").flops == meta.flops


ZOO = [  # (timm model, what it brings)
    ("vit_base_patch16_siglip_224", "SigLIP: attention pooling"),
    ("vit_giantopt_patch16_siglip_384", "attention pooling, > 2 GiB of weights"),
    ("deit_tiny_distilled_patch16_224", "distillation token"),
    ("eva02_tiny_patch14_224", "RoPE, SwiGLU"),
    ("beit_base_patch16_224", "relative position bias"),
    ("cait_xxs24_224", "class attention, talking heads"),
    ("vit_tiny_r_s16_p8_224", "ResNet stem"),
    ("xcit_nano_12_p16_224", "cross-covariance attention, conv patch embedding"),
    ("convit_tiny", "gated positional self-attention"),
    ("samvit_base_patch16_224", "windowed attention, SAM neck"),
    ("naflexvit_base_patch16_map", "NaFlex patchify and position tables, attention pooling"),
    ("qwen3_vit_88m", "a VLM vision tower"),
]


@pytest.mark.parametrize("name, feature", ZOO, ids=[n for n, _ in ZOO])
def test_zoo_model_counts_in_full_on_meta(name, feature):
    timm = pytest.importorskip("timm")
    if name not in timm.list_models():
        pytest.skip(f"the installed timm has no {name}")
    from vitlab.timm_interop import spec_from_timm

    report = analyze(spec_from_timm(name), method="full")
    assert (report.device, report.method) == ("meta", "full"), f"{name} ({feature}) fell back to real weights"
    assert report.flops > 0 and report.flop_counter > 0
