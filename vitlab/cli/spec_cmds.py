"""Commands about recipes and components: ``components``, ``validate``, ``show``, ``build``."""
from __future__ import annotations

import json
import sys

import click

from ..kinds import KINDS
from ..errors import SpecError, VitlabError, one_line, path_label, unknown_choice
from . import cli, set_option
from ..limits import MAX_BATCH
from .output import console


def _defaults(info) -> dict:
    """Each param's default as JSON data (a default factory called), ``"<required>"`` for one without."""
    out = {}
    for key, field in info.cls.Params.model_fields.items():
        if field.is_required():
            out[key] = "<required>"
        else:
            value = field.get_default(call_default_factory=True)
            out[key] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return out


def _params_summary(info) -> str:
    """``qkv_bias=True qk_norm=False ...``: each param with its default (a nested selection by name)."""
    def short(v):
        return f"{{name: {v['name']}, ...}}" if isinstance(v, dict) and "name" in v else repr(v)

    return " ".join(f"{k}={v}" if v == "<required>" else f"{k}={short(v)}" for k, v in _defaults(info).items())


@cli.command()
@click.argument("kind", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON with each component's params schema.")
def components(kind: str | None, as_json: bool) -> None:
    """List registered components (optionally of one KIND), their providers and params. A name two
    plugins register is listed as ambiguous, with both providers (neither is usable until one is
    disabled)."""
    from ..plugins import load_registry

    if kind is not None and kind not in KINDS:
        raise SpecError(unknown_choice("kind", kind, KINDS))
    registry = load_registry()
    rows = [(i, [i.provider], False) for i in registry.components(kind)]
    rows += [(infos[0], [i.provider for i in infos], True) for (k, _), infos in sorted(registry.ambiguous().items())
             if kind is None or k == kind]
    if as_json:
        click.echo(json.dumps([
            {"kind": i.kind, "name": i.name, "provider": " and ".join(providers), "providers": providers,
             "ambiguous": ambiguous, "description": i.description, "params": _defaults(i),
             "schema": i.params_schema()}
            for i, providers, ambiguous in rows
        ], indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title="vitlab components", show_lines=False)
    for col in ("kind", "name", "provider", "params (defaults)", "description"):
        table.add_column(col, overflow="fold")
    for i, providers, ambiguous in rows:
        provider = f"ambiguous: {' and '.join(providers)}" if ambiguous else providers[0]
        table.add_row(Text(i.kind), Text(i.name), Text(provider), Text(_params_summary(i)), Text(i.description))
    console().print(table)


def _load(recipe: str, overrides: tuple[str, ...]):
    from ..recipes import load_spec

    return load_spec(recipe, overrides=list(overrides))


@cli.command()
@click.argument("recipes", nargs=-1, required=True)
@set_option
def validate(recipes: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Check RECIPES (the spec, then one image through its model on the meta device); exit 0 when all
    are valid, else print one line per problem and exit 2."""
    problems: list[str] = []
    for recipe in recipes:
        try:
            spec = _load(recipe, overrides)
            _trace_on_meta(spec)
        except VitlabError as exc:
            problems.extend(exc.lines())
        else:
            click.echo(f"ok: {path_label(recipe)} ({one_line(spec.name)})")
    if problems:
        for line in problems:
            click.echo(f"error: {line}", err=True)
        sys.exit(2)


def _trace_on_meta(spec) -> None:
    """One image through ``spec``'s model on the meta device (nothing allocated): what only a forward
    can tell, such as a block that needs positions a merging block before it lost, is refused here."""
    import torch

    from ..recipes import build_model

    model = build_model(spec, device="meta").eval()
    with torch.no_grad():
        model(torch.zeros(1, spec.in_chans, *spec.img_hw, device="meta"))


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
        registry = spec.registry
        lines = describe_blocks(spec.block_plans(), lambda kind, name: registry.get(kind, name).default_params())
        click.echo("# layout:")
        for line in lines:
            click.echo(f"# {line}")


def _block_rows(plans, seen: dict[int, tuple]) -> list[tuple[str, str]]:
    """One row per run of consecutive blocks of a stage that received the same tokens and grid
    (a token-merging block starts a new run): ``blocks 1-3: (2, 181, 192), merged (no grid), 3 heads``."""
    rows = []
    for p in plans:
        runs: list[list] = []  # [first, last, (shape, grid)]
        for i in range(p.start, p.start + p.depth):
            if runs and runs[-1][2] == seen.get(i):
                runs[-1][1] = i
            else:
                runs.append([i, i, seen.get(i)])
        for first, last, (shape, grid) in runs:
            span = f"{first}" if first == last else f"{first}-{last}"
            where = "merged (no grid)" if grid is None else f"on a {grid[0]}x{grid[1]} grid"
            rows.append((f"stage {p.index}", f"blocks {span}: {shape} {where}, {p.num_heads} heads"))
    return rows


@cli.command()
@click.argument("recipe")
@set_option
@click.option("--batch-size", "-b", default=2, show_default=True, type=click.IntRange(min=1, max=MAX_BATCH))
@click.option("--device", default="meta", show_default=True,
              help="Where to build: 'meta' allocates nothing (any size); 'cpu' allocates and runs a real forward.")
def build(recipe: str, overrides: tuple[str, ...], batch_size: int, device: str) -> None:
    """Build RECIPE and report parameters, tokens and the shapes through the model."""
    import torch

    from ..recipes import build_model

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
    seen: dict[int, tuple] = {}  # block -> (tokens in (B, N, D), grid or None): what the forward really ran

    def keep(index):
        def hook(module, args):  # returns None: a pre-hook's return value would replace the inputs
            seen.setdefault(index, (tuple(args[0].shape), args[1].grid))
        return hook

    plans = spec.stage_plans()
    hooks = [b.register_forward_pre_hook(keep(i)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            tokens = model.forward_features(images)
            out = model.forward_head(tokens)
    finally:
        for h in hooks:
            h.remove()

    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"{one_line(spec.name)}  ({path_label(recipe)})"), show_header=False)
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
        *_block_rows(plans, seen),
        ("forward_features", str(tuple(tokens.shape))),
        ("output", str(tuple(out.shape))),
        ("device", f"{torch_device}" + (" (no memory allocated; shapes only)" if torch_device.type == "meta" else "")),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console().print(table)
