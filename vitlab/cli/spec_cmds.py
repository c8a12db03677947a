"""Commands about recipes and components: ``components``, ``validate``, ``show``, ``build``."""
from __future__ import annotations

import json
import sys

import click

from ..component import KINDS
from ..errors import SpecError, VitlabError, unknown_choice
from . import cli, set_option
from ..analysis.memory import MAX_BATCH
from .output import console


def _params_summary(info) -> str:
    """``qkv_bias=True qk_norm=False ...``: each param with its default."""
    fields = info.cls.Params.model_fields
    return " ".join(f"{k}={v.default!r}" if not v.is_required() else f"{k}=<required>" for k, v in fields.items())


@cli.command()
@click.argument("kind", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON with each component's params schema.")
def components(kind: str | None, as_json: bool) -> None:
    """List registered components (optionally of one KIND), their providers and params."""
    from ..plugins import get_registry

    if kind is not None and kind not in KINDS:
        raise SpecError(unknown_choice("kind", kind, KINDS))
    infos = get_registry().components(kind)
    if as_json:
        click.echo(json.dumps([
            {"kind": i.kind, "name": i.name, "provider": i.provider, "description": i.description,
             "params": i.default_params(), "schema": i.params_schema()}
            for i in infos
        ], indent=2))
        return
    from rich.table import Table

    table = Table(title="vitlab components", show_lines=False)
    for col in ("kind", "name", "provider", "params (defaults)", "description"):
        table.add_column(col, overflow="fold")
    for i in infos:
        table.add_row(i.kind, i.name, i.provider, _params_summary(i), i.description)
    console().print(table)


def _load(recipe: str, overrides: tuple[str, ...]):
    from ..recipes import load_spec

    return load_spec(recipe, overrides=list(overrides))


@cli.command()
@click.argument("recipes", nargs=-1, required=True)
@set_option
def validate(recipes: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Check RECIPES; exit 0 when all are valid, else print one line per problem and exit 2."""
    problems: list[str] = []
    for recipe in recipes:
        try:
            spec = _load(recipe, overrides)
        except VitlabError as exc:
            problems.extend(exc.lines())
        else:
            click.echo(f"ok: {recipe} ({spec.name})")
    if problems:
        for line in problems:
            click.echo(f"error: {line}", err=True)
        sys.exit(2)


@cli.command()
@click.argument("recipe")
@set_option
def show(recipe: str, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved RECIPE (extends and overrides applied, defaults filled) as YAML,
    then, as comments, the per-block layout when blocks or stages differ."""
    from ..layout import describe_blocks
    from ..recipes import dump_spec

    spec = _load(recipe, overrides)
    click.echo(dump_spec(spec), nl=False)
    if spec.layers or spec.stages:
        from ..plugins import get_registry

        registry = get_registry()
        lines = describe_blocks(spec.block_plans(), lambda kind, name: registry.get(kind, name).default_params())
        click.echo("# layout:")
        for line in lines:
            click.echo(f"# {line}")


@cli.command()
@click.argument("recipe")
@set_option
@click.option("--batch-size", "-b", default=2, show_default=True, type=click.IntRange(min=1, max=MAX_BATCH))
@click.option("--device", default="meta", show_default=True,
              help="Where to build: 'meta' allocates nothing (any size); 'cpu' allocates and runs a real forward.")
def build(recipe: str, overrides: tuple[str, ...], batch_size: int, device: str) -> None:
    """Build RECIPE and report parameters, tokens and the shapes through the model."""
    import torch

    from ..model import build_model

    spec = _load(recipe, overrides)
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise VitlabError(f"--device: {exc}") from None
    if torch_device.type != "meta":  # refuse what cannot fit before allocating anything
        from ..analysis.pieces import check_inference_fits

        check_inference_fits(spec, batch_size, device=str(torch_device))
    model = build_model(spec, device=torch_device).eval()
    ctx = model.ctx
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    h, w = spec.img_hw
    images = torch.zeros(batch_size, spec.in_chans, h, w, device=torch_device)
    stage_shapes: dict[int, tuple] = {}

    def keep(stage):
        def hook(module, args):  # returns None: a pre-hook's return value would replace the inputs
            stage_shapes.setdefault(stage, tuple(args[0].shape))
        return hook

    plans = spec.stage_plans()
    hooks = [model.blocks[p.start].register_forward_pre_hook(keep(p.index)) for p in plans if p.depth]
    try:
        with torch.no_grad():
            tokens = model.forward_features(images)
            out = model.forward_head(tokens)
    finally:
        for h in hooks:
            h.remove()

    from rich.table import Table

    table = Table(title=f"{spec.name}  ({recipe})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("parameters", f"{params:,} ({params / 1e6:.2f} M)"),
        ("trainable", f"{trainable:,}"),
        ("weights (fp32)", f"{params * 4 / 2**30:.2f} GiB"),
        ("patch grid", f"{ctx.grid_size[0]} x {ctx.grid_size[1]} = {ctx.num_patches} patches"),
        ("tokens", f"{ctx.num_tokens} ({ctx.num_prefix_tokens} prefix + {ctx.num_patches} patches)"),
        ("components", ", ".join(f"{k}={spec.selection(k).name}" for k in KINDS)),
        ("input", str(tuple(images.shape))),
        *[(f"stage {p.index}", f"blocks {p.start}-{p.start + p.depth - 1}: {stage_shapes.get(p.index)} on a "
           f"{c.grid_size[0]}x{c.grid_size[1]} grid, {p.num_heads} heads")
          for p, c in zip(plans, spec.stage_contexts())],
        ("forward_features", str(tuple(tokens.shape))),
        ("output", str(tuple(out.shape))),
        ("device", f"{torch_device}" + (" (no memory allocated; shapes only)" if torch_device.type == "meta" else "")),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console().print(table)
