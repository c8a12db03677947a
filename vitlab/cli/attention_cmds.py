"""``vitlab attention``: a picture of where a recipe's model attends on an image."""
from __future__ import annotations

import math
from pathlib import Path

import click

from ..errors import VitlabError, path_label
from . import cli, set_option


def _floats3(text: str | None, option: str, positive: bool = False):
    """``"0.5,0.5,0.5"`` -> three finite floats (``positive``: each > 0, as a divisor must be)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise VitlabError(f"{option}: expected three comma-separated numbers (R,G,B), got {text!r}")
    # nan / inf, or a zero or negative std, would normalise the image into nan / inf and draw blank maps
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        need = "positive" if positive else "finite"
        raise VitlabError(f"{option}: expected three {need} numbers (R,G,B), got {text!r}")
    return values


# The image is resized to (image size / crop_pct) before the centre crop: a tiny crop_pct asks for
# a resize of any size (1e-9: 3 x 32e9 x 32e9 pixels). The cap is the largest img_size a recipe may have.
MAX_RESIZE = 2**16


def _check_seed(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """A seed torch takes; the range is said in words, not as 19 digits in ``--help``."""
    if not 0 <= value < 2**63:
        raise click.BadParameter(f"expected an integer from 0 to 2**63 - 1, got {value}")
    return value


def _build(spec, weights: Path | None, seed: int):
    """The recipe's model with its weights: a vitlab checkpoint (its spec must equal the
    recipe's), a timm checkpoint, or a fresh initialisation. Returns (model, where from)."""
    from .. import checkpoint
    from ..recipes import build_model

    from ..analysis.pieces import check_inference_fits

    check_inference_fits(spec, 1)  # one image: refuse a model that cannot fit before allocating it
    if weights is None:
        return build_model(spec, seed=seed), f"random init, seed {seed}"
    from ..fileio import check_input

    check_input(weights, "weights file")
    if checkpoint.is_vitlab_checkpoint(weights):
        saved = checkpoint.read_spec(weights)  # the header only: refuse before reading tensors
        if saved != spec:
            diff = sorted(k for k, v in saved.to_dict().items() if spec.to_dict().get(k) != v)
            raise VitlabError(f"{path_label(weights)} was saved from a different spec (differs in: {', '.join(diff)})")
        return checkpoint.load(weights), "vitlab checkpoint"
    from ..timm_interop import load_timm_weights

    model = build_model(spec, seed=seed)
    load_timm_weights(model, weights, strict=True)
    return model, "timm checkpoint"


@cli.command()
@click.argument("recipe")
@click.option("--image", "image_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Input image file.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), help="A vitlab checkpoint or a timm checkpoint matching the recipe.")
@click.option("--layer", default="-1", show_default=True, help="Block index (negative counts from the end) or 'all'.")
@click.option("--head", default="mean", show_default=True, help="Head index, or 'mean' (with one layer: every head plus their mean).")
@click.option("--rollout", is_flag=True, help="Show attention rollout through all layers instead of single-layer maps.")
@click.option("--head-fusion", type=click.Choice(["mean", "max", "min"]), default="mean", show_default=True, help="How rollout fuses heads.")
@click.option("--discard-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, help="Rollout: fraction of weakest links dropped per layer.")
@click.option("--crop-pct", type=float, default=0.875, show_default=True, help="Resize the shorter side to size / crop_pct, then centre-crop.")
@click.option("--mean", "mean_text", default=None, help="Normalisation mean R,G,B (default ImageNet).")
@click.option("--std", "std_text", default=None, help="Normalisation std R,G,B (default ImageNet).")
@click.option("--seed", type=int, default=0, show_default=True, metavar="N", callback=_check_seed,
              help="Initialisation seed when no --weights are given (an integer from 0).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@set_option
def attention(recipe, image_path, weights, layer, head, rollout, head_fusion, discard_ratio, crop_pct,
              mean_text, std_text, seed, output, force, overrides) -> None:
    """Draw RECIPE's attention on IMAGE: heatmaps per head or per layer, or the rollout."""
    import torch

    from ..maps import patch_heatmap, record_attention, staged_rollout
    from ..attention_plot import attention_figure, save_figure
    from ..fileio import atomic_write, check_writable
    from ..images import IMAGENET_MEAN, IMAGENET_STD, load_image, normalize, resize_center_crop
    from ..recipes import load_spec

    check_writable(output, force)  # fail before any work
    mean = _floats3(mean_text, "--mean") or IMAGENET_MEAN
    std = _floats3(std_text, "--std", positive=True) or IMAGENET_STD
    spec = load_spec(recipe, overrides=list(overrides))
    if 0 < crop_pct <= 1 and max(spec.img_hw) / crop_pct > MAX_RESIZE:
        raise VitlabError(f"--crop-pct {crop_pct:g} resizes the image to {max(spec.img_hw) / crop_pct:,.0f} px before "
                          f"cropping; at most {MAX_RESIZE:,} (give a crop_pct of at least {max(spec.img_hw) / MAX_RESIZE:g})")
    model, source = _build(spec, weights, seed)
    model.eval()
    crop = resize_center_crop(load_image(image_path), spec.img_hw, crop_pct)
    x = normalize(crop, mean, std)
    records = record_attention(model, x[None])  # per block: (1, heads, N, N) with its own N and grid

    def heat(record, a: torch.Tensor) -> torch.Tensor:  # (1, N, N) or (1, h, N, N) -> (gh, gw) of that block
        if record.grid is None:
            raise VitlabError(f"block {record.block_index}'s tokens were merged off the patch grid: its attention "
                              "has no place on the image (choose an earlier --layer)")
        return patch_heatmap(a, record.grid, record.num_prefix, spec.class_token)[0]

    depth = len(records)
    if rollout:
        # rollout composes token-to-token maps: through every stage whose grid nests in the one before
        # (patch merging, pooling), ending at the last such run; class attention's (1 x N) maps cannot
        rolled, used = staged_rollout(records, head_fusion, discard_ratio)
        last, first = records[used[-1]], records[used[0]]
        panel = heat(first, rolled)  # (B, N_last, N_first): drawn on the first stage's grid, the finest
        span = "" if len(used) == depth else f", blocks {used[0]}-{used[-1]}"
        stages_text = "" if first.stage_index == last.stage_index else f" through stages {first.stage_index}-{last.stage_index}"
        panels = [(panel, f"rollout ({head_fusion}, discard {discard_ratio:g}){span}{stages_text}")]
    else:
        layers = list(range(depth)) if layer == "all" else [_index(layer, depth, "--layer")]
        heads = min(records[li].map.shape[1] for li in layers)  # stages may differ in heads
        if head == "mean":
            head_ids: list[int | None] = [None] if len(layers) > 1 else [*range(heads), None]
        else:
            head_ids = [_index(head, heads, "--head")]
        panels = []
        for li in layers:
            r = records[li]
            grid = "" if r.grid is None else f" ({r.grid[0]}x{r.grid[1]})"
            for hi in head_ids:
                a = r.map.mean(dim=1) if hi is None else r.map[:, hi]
                panels.append((heat(r, a), f"layer {li}{grid}, {'mean of heads' if hi is None else f'head {hi}'}"))
    query = "class token" if spec.class_token else "mean over tokens"
    title = f"{spec.name}: attention from the {query} ({source})"
    fig = attention_figure(crop, [p[0] for p in panels], [p[1] for p in panels], title)
    atomic_write(output, lambda tmp: save_figure(fig, tmp), force=force)
    click.echo(f"wrote {path_label(output)} ({len(panels)} heatmaps)")


def _index(text: str, size: int, option: str) -> int:
    try:
        i = int(text)
    except ValueError:
        raise VitlabError(f"{option}: expected an integer in [{-size}, {size - 1}] or the keyword shown in --help, got {text!r}") from None
    if not -size <= i < size:
        raise VitlabError(f"{option} {i} is out of range: the model has {size} (valid: {-size} to {size - 1})")
    return i % size
