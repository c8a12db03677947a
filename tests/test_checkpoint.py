"""Native checkpoints (issue 4): ``vitlab.save`` writes safetensors with the spec in the metadata,
``vitlab.load`` rebuilds the exact model from the file alone."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import vitlab
from vitlab import VitlabError, WeightsError, build_model, load_spec
from vitlab.checkpoint import is_vitlab_checkpoint, read_spec

TINY = {"name": "tiny", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "num_classes": 10}

VARIANTS = {
    "default": {},
    "sincos_registers": {"pos_embed": "sincos2d", "reg_tokens": 2},
    "map_pool_swiglu": {"pool": {"name": "map", "params": {"latent_len": 2}}, "mlp": "swiglu"},
    "parallel_rms_layer_scale": {"block": {"name": "parallel", "params": {"init_values": 0.1}}, "norm": "rmsnorm"},
    "linear_embed_avg": {"patch_embed": "linear", "class_token": False, "pool": {"name": "avg", "params": {"norm": True}}},
}


def _randomized(spec):
    model = build_model(spec, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=VARIANTS.keys())
def test_save_load_rebuilds_the_exact_model(tmp_path, changes):
    spec = load_spec({**TINY, **changes})
    model = _randomized(spec)
    path = vitlab.save(model, tmp_path / "m.safetensors")
    assert path == tmp_path / "m.safetensors" and is_vitlab_checkpoint(path)
    loaded = vitlab.load(path)
    assert loaded.spec == spec and read_spec(path) == spec
    assert set(loaded.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert all(not b.is_meta for b in loaded.buffers()) and all(not p.is_meta for p in loaded.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_metadata_holds_the_spec(tmp_path):
    spec = load_spec(TINY)
    path = vitlab.save(build_model(spec), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "vitlab"
    assert json.loads(meta["vitlab_spec"]) == spec.to_dict()


def test_refuses_to_overwrite_unless_forced(tmp_path):
    path = tmp_path / "m.safetensors"
    first = build_model(load_spec(TINY), seed=0)
    vitlab.save(first, path)
    original = path.read_bytes()
    with pytest.raises(VitlabError, match="already exists"):
        vitlab.save(build_model(load_spec(TINY), seed=1), path)
    assert path.read_bytes() == original
    vitlab.save(build_model(load_spec({**TINY, "depth": 1}), seed=1), path, force=True)
    assert vitlab.load(path).spec.depth == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary files left


def test_save_into_a_missing_folder_fails_cleanly(tmp_path):
    with pytest.raises(VitlabError, match="does not exist"):
        vitlab.save(build_model(load_spec(TINY)), tmp_path / "nope" / "m.safetensors")


def test_load_device_and_dtype(tmp_path):
    path = vitlab.save(build_model(load_spec(TINY)), tmp_path / "m.safetensors")
    model = vitlab.load(path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_not_a_vitlab_checkpoint(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert not is_vitlab_checkpoint(plain)
    with pytest.raises(WeightsError, match="not a vitlab checkpoint"):
        vitlab.load(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert not is_vitlab_checkpoint(garbage)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        vitlab.load(garbage)
    with pytest.raises(WeightsError, match="no such file"):
        vitlab.load(tmp_path / "missing.safetensors")
    assert not is_vitlab_checkpoint(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_stored_spec(tmp_path):
    model = build_model(load_spec(TINY))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    spec = load_spec({**TINY, "depth": 3})
    path = tmp_path / "tampered.safetensors"
    save_file(tensors, str(path), metadata={"format": "vitlab", "vitlab_spec": json.dumps(spec.to_dict())})
    with pytest.raises(WeightsError, match="missing: blocks.2.norm1.weight"):
        vitlab.load(path)
    bad = tmp_path / "bad_spec.safetensors"
    save_file(tensors, str(bad), metadata={"format": "vitlab", "vitlab_spec": json.dumps({**TINY, "depht": 2})})
    with pytest.raises(vitlab.SpecError, match="depht"):
        vitlab.load(bad)
    broken = tmp_path / "broken_json.safetensors"
    save_file(tensors, str(broken), metadata={"format": "vitlab", "vitlab_spec": "{not json"})
    with pytest.raises(WeightsError, match="not valid JSON"):
        vitlab.load(broken)


def test_loads_through_load_timm_weights_is_redirected(tmp_path):
    from vitlab.timm_interop import load_timm_weights

    model = build_model(load_spec(TINY))
    path = vitlab.save(model, tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match="vitlab.load"):
        load_timm_weights(model, path)
