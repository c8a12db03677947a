"""vitlab models under torch.distributed on CPU (gloo): DDP and FSDP2 ``fully_shard`` per block.

Reference: one process training on the two ranks' batches concatenated. With mean losses of equal
batch sizes, the averaged gradient of two ranks equals the gradient of the concatenated batch, so
every rank must end with the reference's weights (and hence identical replicas).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import vitlab

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5,
        "reg_tokens": 1, "attention": {"name": "mhsa", "params": {"qk_norm": True}}}
WORLD, STEPS, BATCH = 2, 2, 4


def _batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 5, (BATCH,), generator=g)) for _ in range(STEPS)]


def _train(model, batches_per_step):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in batches_per_step:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _full_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        out[k.replace("_orig_mod.", "").replace("module.", "")] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def _worker(rank: int, mode: str, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model = vitlab.build_model(vitlab.load_spec(TINY), seed=0)
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        _train(model, _batches(rank))
        torch.save(_full_state(model), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_training_matches_single_process(mode, tmp_path):
    if mode == "fsdp":
        pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("this torch has no fully_shard (FSDP2)")
    init = "file://" + str(tmp_path / "rendezvous")
    mp.spawn(_worker, args=(mode, init, str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    reference = vitlab.build_model(vitlab.load_spec(TINY), seed=0)
    per_rank = [_batches(r) for r in range(WORLD)]
    combined = [(torch.cat([b[s][0] for b in per_rank]), torch.cat([b[s][1] for b in per_rank])) for s in range(STEPS)]
    _train(reference, combined)
    expected = _full_state(reference)

    initial = _full_state(vitlab.build_model(vitlab.load_spec(TINY), seed=0))
    assert any(not torch.equal(initial[k], expected[k]) for k in expected), "training changed nothing"
    for state in states:
        assert state.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(state[k], expected[k], atol=1e-5, rtol=1e-4, msg=f"{mode}: {k}")
    for k in expected:  # replicas hold identical weights
        assert torch.equal(states[0][k], states[1][k]), k
