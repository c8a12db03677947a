"""Recipes registered with timm are timm models: ``timm.create_model`` builds them with what
timm's train.py passes, and timm's optimizer, data config, transforms, EMA and loaders train one."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")
import timm.data  # noqa: E402
import timm.optim  # noqa: E402
import timm.utils  # noqa: E402

import vitlab  # noqa: E402
from vitlab.recipes import bundled_recipes  # noqa: E402

TINY = dict(name="tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def test_every_bundled_recipe_is_listed():
    names = vitlab.register_timm_models()
    assert set(timm.list_models("vitlab_*")) >= set(names)
    assert "vitlab_vit_tiny_patch16_224" in names
    assert all("/" not in n for n in names)
    assert len(names) >= len([r for r in bundled_recipes() if not r.startswith("plugins/")])
    assert vitlab.register_timm_models() == names  # again: no-op


def test_create_model_honours_train_py_kwargs():
    vitlab.register_timm_models()
    model = timm.create_model("vitlab_vit_tiny_patch16_224", pretrained=False, num_classes=5, drop_rate=0.1,
                              drop_path_rate=0.2, img_size=64, in_chans=1, global_pool="avg", drop_block_rate=None)
    spec = model.spec
    assert (spec.num_classes, spec.drop_rate, spec.drop_path_rate, spec.img_hw, spec.in_chans, spec.pool.name) == \
        (5, 0.1, 0.2, (64, 64), 1, "avg")
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        timm.create_model("vitlab_vit_tiny_patch16_224", bn_momentum=0.1)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("vitlab_vit_tiny_patch16_224", pretrained=True)


def test_user_recipe_registers_and_loads_a_vitlab_checkpoint(tmp_path):
    name = vitlab.register_timm_model(TINY)
    assert name == "vitlab_tiny" and timm.is_model(name)
    model = timm.create_model(name)
    path = vitlab.save(model, tmp_path / "tiny.safetensors")
    again = timm.create_model(name, checkpoint_path=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))
    recipe = tmp_path / "my_vit.yaml"
    recipe.write_text("name: mine\nimg_size: 32\npatch_size: 8\nembed_dim: 32\ndepth: 1\nnum_heads: 2\n")
    assert vitlab.register_timm_model(recipe) == "vitlab_my_vit"
    assert vitlab.register_timm_model(recipe, name="other_name") == "other_name"
    assert timm.create_model("other_name").spec.depth == 1


def test_import_vitlab_stays_light():
    code = "import sys, vitlab; assert 'register_timm_models' in dir(vitlab); print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_few_training_steps_through_timms_pipeline(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(3):  # a tiny ImageFolder: 3 classes x 4 images, 40 px
        folder = tmp_path / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    name = vitlab.register_timm_model(TINY)
    model = timm.create_model(name, num_classes=3, drop_path_rate=0.1)
    config = timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (3, 32, 32)
    timm.data.create_transform(**config, is_training=True)
    dataset = timm.data.create_dataset("", root=str(tmp_path / "train"), split="train", is_training=True)
    loader = timm.data.create_loader(dataset, input_size=config["input_size"], batch_size=4, is_training=True,
                                     use_prefetcher=False, mean=config["mean"], std=config["std"], num_workers=0)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    losses = []
    for step, (images, target) in enumerate(loader):
        loss = loss_fn(model(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=step)
        losses.append(loss.item())
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        assert ema.module.eval()(images).shape == (4, 3)
