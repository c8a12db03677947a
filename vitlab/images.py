"""Images in and out of a model: evaluation preprocessing (as timm's eval transform) and a
procedurally generated test picture (no data set can be downloaded here)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import VitlabError, one_line, path_label
from .fileio import check_input

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# An input picture is cropped to a few hundred pixels; 8192 x 8192 is far beyond any real use. A
# 20000 x 20000 PNG of one colour is a few hundred KB and decodes to 1.2 GB: refuse it from its
# header, before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192


def load_image(path: str | Path) -> torch.Tensor:
    """An RGB image file as a float tensor (3, H, W) in [0, 1].

    Raises:
        VitlabError: no such file, a directory, not an image, or larger than ``MAX_IMAGE_PIXELS``
            (checked from the header, before anything is decoded).
    """
    from PIL import Image, UnidentifiedImageError

    label = path_label(path)
    check_input(path, "image")  # a FIFO would block, a device never end
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it: a warning here is a refusal
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # lazy: reads the header, decodes nothing yet
                _check_pixels(label, img.size)
                if img.mode in WIDE_MODES:
                    return _wide_gray(img)
                rgb = img.convert("RGB")
    except FileNotFoundError:
        raise VitlabError(f"image not found: {label}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise VitlabError(f"{label}: refused as a decompression bomb ({one_line(str(exc))})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:  # ValueError: PIL's own size limits on chunks
        raise VitlabError(f"cannot read image {label}: {one_line(str(exc))}") from None
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.reshape(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255.0


# single-channel modes PIL's convert("RGB") would clip to 8 bits (a 16-bit PNG saturates to white,
# a float TIFF in [0, 1] turns black): mode -> the value that is white
WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
              "I": 65535.0,  # 32-bit integers: what 16-bit PNGs and TIFFs decode to in PIL
              "F": 1.0}  # floats in [0, 1], the convention of float TIFFs


def _wide_gray(img) -> torch.Tensor:
    """A wide grey image -> (3, H, W) in [0, 1], scaled by its mode's white (``WIDE_MODES``)."""
    import numpy as np

    values = torch.from_numpy(np.asarray(img, dtype=np.float64).copy())  # (H, W)
    values = torch.nan_to_num(values / WIDE_MODES[img.mode], nan=0.0).clamp_(0.0, 1.0).float()
    return values.expand(3, *values.shape).clone()


def _check_pixels(label: str, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise VitlabError(f"{label}: the image is {width}x{height} ({width * height:,} pixels); "
                          f"at most {MAX_IMAGE_PIXELS:,} pixels (8192x8192) are read")


def resize_center_crop(image: torch.Tensor, size: tuple[int, int], crop_pct: float = 0.875) -> torch.Tensor:
    """(3, H, W) -> (3, h, w): resize the shorter side to ``size / crop_pct`` (bicubic), then crop
    the centre, as timm's default evaluation transform."""
    if not 0 < crop_pct <= 1:
        raise VitlabError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = size
    scale_to = math.floor(max(h, w) / crop_pct)
    H, W = image.shape[-2:]
    ratio = scale_to / min(H, W)
    new_h, new_w = max(h, round(H * ratio)), max(w, round(W * ratio))
    if new_h * new_w > 16 * h * w:
        # An extreme aspect ratio (a 1 x 20000 strip) would be resized whole to millions of pixels
        # before the crop: cut the source to the centre that survives, plus the resampling
        # kernel's reach, first (memory bounded by the output, at a sub-pixel shift at most).
        keep_h = min(H, math.ceil(h / ratio) + 2 * math.ceil(2 / ratio) + 2)
        keep_w = min(W, math.ceil(w / ratio) + 2 * math.ceil(2 / ratio) + 2)
        top, left = (H - keep_h) // 2, (W - keep_w) // 2
        image = image[:, top : top + keep_h, left : left + keep_w]
        H, W = keep_h, keep_w
        new_h, new_w = max(h, round(H * ratio)), max(w, round(W * ratio))
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (new_h - h) // 2, (new_w - w) // 2
    return resized[:, top : top + h, left : left + w].clamp(0, 1)


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> normalised with per-channel mean and std."""
    m = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image - m) / s


def procedural_batch(n: int, size: int = 224, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic synthetic pictures (n, 3, size, size) in [0, 1] and the centres (n, 2) of
    their discs as (y, x) fractions: a gradient sky, a textured ground and one bright disc, so that
    attention has something to find."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    sky = torch.stack([0.35 + 0.3 * y, 0.55 + 0.25 * y, 0.9 - 0.2 * y])  # (3, S, S)
    ground = torch.stack([0.25 + 0.1 * x, 0.45 + 0.1 * torch.sin(12 * x), 0.2 + 0.05 * y])
    ground = ground + 0.06 * torch.randn(n, 3, size, size, generator=g)  # (n, 3, S, S)
    img = torch.where((y > 0.62)[None, None], ground, sky[None])
    centres = 0.15 + 0.7 * torch.rand(n, 2, generator=g)  # (n, 2): (y, x)
    radius = 0.1 + 0.05 * torch.rand(n, 1, 1, generator=g)
    dist = ((y[None] - centres[:, 0, None, None]) ** 2 + (x[None] - centres[:, 1, None, None]) ** 2).sqrt()
    disc = (dist < radius)[:, None]  # (n, 1, S, S)
    img = torch.where(disc, torch.tensor([0.95, 0.75, 0.2]).view(1, 3, 1, 1), img)
    return img.clamp(0, 1), centres


def procedural_image(size: int = 224, seed: int = 0) -> torch.Tensor:
    """One picture of ``procedural_batch``: (3, size, size) in [0, 1]."""
    return procedural_batch(1, size, seed)[0][0]


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """(3, H, W) in [0, 1] -> PNG file."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(arr).save(path, format="PNG")
