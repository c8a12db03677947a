"""The one analysis walk (``vitlab.analysis.pieces.Walk``): a derived count, a sweep's shared cache
and the memory prediction are the same walk, equal to a full trace; and the one timing module
(``vitlab.timing``) that ``bench``, ``--measure`` and ``benchmarks/`` use."""
from __future__ import annotations

import pytest
import torch

from vitlab import analyze, build_model, load_spec
from vitlab.analysis.pieces import PieceCache, Walk, predict_vit
from vitlab.timing import alternate, call_times, median_seconds

HOW = ("derived", "derivation", "method", "device")  # what says how a count was made


_POOL = {"name": "pit_pool", "params": {"stride": 2}}
STAGED = {"stages": [{"depth": 1, "embed_dim": 64, "num_heads": 2},  # pit_ti_like, one or two blocks a stage
                     {"depth": 2, "embed_dim": 128, "num_heads": 4, "transition": _POOL},
                     {"depth": 1, "embed_dim": 256, "num_heads": 8, "transition": _POOL}]}


def _figures(report) -> dict:
    return {k: v for k, v in report.to_dict().items() if k not in HOW}


def _meta(name: str, **overrides):
    return build_model(load_spec(name, overrides or None), device="meta").eval()


def test_one_walk_counts_and_predicts_memory_like_a_full_trace():
    spec = load_spec("pit_ti_like", STAGED)
    full = analyze(spec, method="full")
    model = _meta("pit_ti_like", **STAGED)
    walked = Walk(model).run(torch.empty(1, 3, *spec.img_hw, device="meta"), memory=torch.float32)
    assert walked.counts.total("flops") == full.flops
    assert [walked.tokens[("stage", i)] for i in range(len(full.stage_tokens))] == full.stage_tokens
    assert walked.tokens["out"] == full.tokens_out
    embed, blocks, head = walked.memory
    assert len(blocks) == spec.depth
    assert predict_vit(model, (1, 3, *spec.img_hw))[0] == full.memory


def test_a_shared_cache_serves_derived_counts_sweeps_and_memory():
    cache = PieceCache()
    first = analyze("vit_tiny_patch16_224", overrides={"depth": 3}, cache=cache)
    misses = cache.misses
    again = analyze("vit_tiny_patch16_224", overrides={"depth": 3}, cache=cache)
    assert cache.misses == misses and cache.hits > 0  # nothing traced twice
    deeper = analyze("vit_tiny_patch16_224", overrides={"depth": 5}, cache=cache, method="derived")
    assert first.method == again.method == deeper.method == "derived"
    assert _figures(first) == _figures(again)
    assert _figures(deeper) == _figures(analyze("vit_tiny_patch16_224", overrides={"depth": 5}, method="full"))


def test_blocks_differing_only_in_drop_path_are_one_configuration():
    """FLOPs group blocks as inference sees them; the cache still keys memory by the dropout rate."""
    report = analyze("vit_tiny_patch16_224", overrides={"depth": 3, "drop_path_rate": 0.1}, method="derived")
    assert "1 distinct" in report.derivation
    assert _figures(report) == _figures(analyze("vit_tiny_patch16_224", overrides={"depth": 3, "drop_path_rate": 0.1},
                                                method="full"))


def test_a_real_model_is_walked_where_it_is_and_left_as_it_was():
    model = build_model(load_spec("vit_tiny_patch16_224", {"depth": 2}), seed=0).eval()
    images = torch.zeros(1, 3, 224, 224)
    walked = Walk(model).run(images)
    assert walked.counts.total("flops") == analyze(model, method="full").flops
    with pytest.raises(ValueError, match="meta"):
        Walk(model).run(images, memory=torch.float32)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_real_weights_hold_one_block_at_a_time():
    model = _meta("vit_tiny_patch16_224", depth=2)
    walked = Walk(model, real_weights=True).run(torch.zeros(1, 3, 224, 224))
    assert walked.counts.total("flops") == analyze("vit_tiny_patch16_224", overrides={"depth": 2}).flops
    assert all(p.is_meta for p in model.blocks.parameters())  # each block released after its count


def test_stage_starting_at_names_the_transition_into_each_stage():
    model = _meta("pit_ti_like", **STAGED)
    starts = {p.start: str(p.index) for p in model.spec.stage_plans()[1:]}
    assert starts and all(model.stage_starting_at(i) == stage for i, stage in starts.items())
    assert all(model.stage_starting_at(i) is None for i in range(len(model.blocks)) if i not in starts)
    assert set(starts.values()) == set(model.transitions.keys())


# --- timing ------------------------------------------------------------------------------------------------

def test_timing_medians_and_alternation():
    calls = []
    times = call_times(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)
    assert median_seconds(lambda: None, "cpu", warmup=0, repeats=1) >= 0
    order = []
    result = alternate(lambda: order.append("a"), lambda: order.append("b"), warmup=0, rounds=2)
    assert order == ["a", "b", "b", "a"] and result["ratio"] > 0

