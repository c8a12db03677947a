"""Weights on the command line: ``from-timm NAME --weights FILE`` and ``--pretrained`` (from a
local Hugging Face cache laid out as the hub lays it out, never downloaded) write vitlab
checkpoints whose outputs equal timm's; ``to-timm`` writes timm's state dict back."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vitlab  # noqa: E402

from conftest import invoke_cli, one_error  # noqa: E402
from timm_reference import randomize  # noqa: E402

NAME = "vit_tiny_patch16_224"
TAG = "augreg_in21k_ft_in1k"


@pytest.fixture(scope="module")
def reference():
    return randomize(timm.create_model(NAME, pretrained=False)).eval()


def save_timm(model, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def same_outputs(checkpoint, tm):
    model = vitlab.load(checkpoint).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), tm(x)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_from_timm_weights_writes_a_checkpoint(tmp_path, reference, suffix):
    weights = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), weights)
    else:
        save_timm(reference, weights)
    out = tmp_path / "model.safetensors"
    res = invoke_cli("from-timm", NAME, "--weights", weights, "-o", out)
    assert res.exit_code == 0, res.output
    same_outputs(out, reference)
    again = invoke_cli("from-timm", NAME, "--weights", weights, "-o", out)
    assert "exists" in one_error(again)
    assert invoke_cli("from-timm", NAME, "--weights", weights, "-o", out, "--force").exit_code == 0


def fake_hub(root, reference, repo=f"timm/{NAME}.{TAG}", rev="0123abcd"):
    """A Hugging Face cache as the hub writes it: models--ORG--NAME/{refs/main, snapshots/REV/}."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "snapshots" / rev).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    save_timm(reference, folder / "snapshots" / rev / "model.safetensors")


def test_from_timm_pretrained_reads_the_local_cache(tmp_path, reference, monkeypatch):
    cache = tmp_path / "hub"
    fake_hub(cache, reference)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "model.safetensors"
    res = invoke_cli("from-timm", f"{NAME}.{TAG}", "--pretrained", "-o", out)
    assert res.exit_code == 0, res.output
    same_outputs(out, reference)


def test_an_uncached_tag_is_one_error_saying_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_error(invoke_cli("from-timm", f"{NAME}.{TAG}", "--pretrained", "-o", tmp_path / "m.safetensors"))
    assert "not cached" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "m.safetensors").exists()


def test_to_timm_writes_timms_state_dict(tmp_path, reference):
    from safetensors.torch import load_file

    weights = save_timm(reference, tmp_path / "w.safetensors")
    ckpt = tmp_path / "model.safetensors"
    assert invoke_cli("from-timm", NAME, "--weights", weights, "-o", ckpt).exit_code == 0
    out = tmp_path / "timm.safetensors"
    res = invoke_cli("to-timm", ckpt, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"timm.create_model('{NAME}'" in res.stdout
    rebuilt = timm.create_model(NAME, pretrained=False).eval()
    rebuilt.load_state_dict(load_file(str(out)))
    for k, v in reference.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    assert "exists" in one_error(invoke_cli("to-timm", ckpt, "-o", out))
