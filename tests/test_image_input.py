"""Images for ``vitlab attention --image``: by their mode's real range, and only regular files.

A 16-bit PNG saturated to white and a float TIFF in [0, 1] loaded as black through PIL's 8-bit
``convert("RGB")``; a FIFO blocked forever. The expected pixels are the arrays the test wrote,
scaled by hand.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.errors import VitlabError
from vitlab.images import load_image


def _gradient(dtype, top):
    return (np.linspace(0, 1, 16 * 24).reshape(16, 24) * top).astype(dtype)


def test_a_16_bit_png_keeps_its_range(tmp_path):
    a = _gradient(np.uint16, 65535)
    Image.fromarray(a).save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    assert img.shape == (3, 16, 24)
    expected = torch.from_numpy(a.astype(np.float64) / 65535).float()
    for channel in img:  # grey: the same values in R, G and B
        torch.testing.assert_close(channel, expected)
    assert 0.45 < img.mean() < 0.55  # not saturated to white


def test_a_float_tiff_in_unit_range_is_not_black(tmp_path):
    f = _gradient(np.float32, 1.0)
    f[0, 0], f[0, 1] = 2.0, np.nan  # out of range: clamped; NaN: black
    Image.fromarray(f).save(tmp_path / "f.tiff")
    img = load_image(tmp_path / "f.tiff")
    expected = torch.from_numpy(np.nan_to_num(np.clip(f, 0, 1))).float()
    torch.testing.assert_close(img[1], expected)


def test_an_8_bit_rgb_png_is_unchanged(tmp_path):
    rgb = (np.arange(16 * 24 * 3) % 256).astype(np.uint8).reshape(16, 24, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    torch.testing.assert_close(load_image(tmp_path / "rgb.png"), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pic.png"
    os.mkfifo(fifo)
    with pytest.raises(VitlabError, match="not a regular file"):
        load_image(fifo)  # would block forever if opened


def test_weights_that_are_a_fifo_are_not_reported_as_missing(tmp_path):
    """``vitlab attention --weights FIFO`` said "not found"; the loaders now say what it is."""
    from vitlab.errors import WeightsError
    from vitlab.timm_interop.sources import open_file

    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError, match="is not a regular file"):
        with open_file(fifo):
            pass
    from conftest import invoke_cli, one_error

    image = tmp_path / "pic.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    line = one_error(invoke_cli("attention", "vit_tiny_patch16_224", "--set", "depth=1", "--weights", fifo,
                                "--image", image, "-o", tmp_path / "out.png"))
    assert "is not a regular file" in line and "not found" not in line
