"""``vitlab from-timm`` (a timm model's recipe, or with weights a vitlab checkpoint) and
``vitlab to-timm`` (a vitlab checkpoint as timm's state dict)."""
from __future__ import annotations

import os
from pathlib import Path

import click

from . import cli

HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _hub_cache() -> Path:
    """Where the Hugging Face hub keeps models: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ~/.cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def cached_pretrained(name: str) -> Path:
    """The local file of timm's pretrained weights for ``name`` (``arch.tag``): the file timm's cfg
    names, or the hub repo's snapshot in the local cache (``refs/main`` -> ``snapshots/REV/``).
    Nothing is downloaded.

    Raises:
        WeightsError: timm has no pretrained cfg for ``name``, or nothing is cached (says where it looked).
    """
    import timm

    from ..errors import WeightsError

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise WeightsError(f"timm has no pretrained weights for '{name}'")
    if cfg.file:
        if os.path.isfile(cfg.file):
            return Path(cfg.file)
        looked = [cfg.file]
    else:
        looked = []
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        repo = _hub_cache() / ("models--" + repo_id.replace("/", "--"))
        ref = repo / "refs" / (revision or "main")
        rev = ref.read_text().strip() if ref.is_file() else (revision or None)
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
        for filename in files:
            path = repo / "snapshots" / (rev or "<no refs/main>") / filename
            if rev and path.is_file():
                return path
            looked.append(str(path))
    if not looked:
        raise WeightsError(f"timm's pretrained cfg of '{name}' names no local file or hub repo "
                           f"(only a URL, {cfg.url or 'none'}): vitlab does not download; use --weights FILE")
    raise WeightsError(f"pretrained weights of '{name}' are not cached (nothing is downloaded); looked in "
                       + ", ".join(looked))


@cli.command("from-timm")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Recipe file to write (YAML), or with weights the vitlab checkpoint (.safetensors); "
                   "without it the recipe goes to stdout.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="Weights to load (.safetensors, .pth, .bin, .npz; timm's or the original layout); "
                   "writes a vitlab checkpoint to OUTPUT.")
@click.option("--pretrained", is_flag=True,
              help="Load timm's pretrained weights for NAME (NAME.tag picks a tag) from the local Hugging Face "
                   "cache or the file timm's cfg names; nothing is downloaded.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def from_timm(name: str, output: Path | None, weights: Path | None, pretrained: bool, force: bool) -> None:
    """Write the recipe of timm model NAME (read from the model's structure; no weights are
    downloaded), or with --weights / --pretrained a vitlab checkpoint with its spec. Fails naming
    the feature when vitlab cannot express the model."""
    from ..errors import VitlabError, path_label
    from ..fileio import atomic_write, check_input, check_output, check_writable

    if weights is not None and pretrained:
        raise click.UsageError("give --weights FILE or --pretrained, not both")
    if weights is not None or pretrained:
        if output is None:
            raise click.UsageError("--weights / --pretrained write a checkpoint: give -o OUT.safetensors")
        if output.suffix.lower() != ".safetensors":
            raise VitlabError(f"{path_label(output)}: a vitlab checkpoint is a .safetensors file")
        check_output(output, force)  # fail before building anything
        from ..checkpoint import save
        from ..recipes import build_model
        from ..timm_interop import load_timm_weights, spec_from_timm

        arch = name.split(".", 1)[0]  # a pretrained tag names weights, not another structure
        source = cached_pretrained(name) if pretrained else check_input(weights, "weights file")
        model = build_model(spec_from_timm(arch))
        report = load_timm_weights(model, source)
        save(model, output, force=force)
        click.echo(f"wrote {path_label(output)} ({report.summary()} "
                   f"from {path_label(Path(source))})", err=True)
        return
    from ..recipes import dump_spec
    from ..timm_interop import spec_from_timm

    if output is not None:
        check_writable(output, force)  # fail before building anything
    spec = spec_from_timm(name)
    import timm

    text = f"# {name}: generated by `vitlab from-timm` from timm {timm.__version__}\n" + dump_spec(spec)
    if output is None:
        click.echo(text, nl=False)
        return
    atomic_write(output, text, force=force)
    click.echo(f"wrote {path_label(output)}", err=True)


@cli.command("to-timm")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="timm state dict to write (.safetensors).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def to_timm(checkpoint: Path, output: Path, force: bool) -> None:
    """Write the weights of vitlab CHECKPOINT as timm's state dict, and print the timm model name
    and keyword arguments that rebuild the model they load into."""
    from ..checkpoint import load
    from ..errors import VitlabError, path_label
    from ..fileio import atomic_write, check_output
    from ..timm_interop import timm_class, timm_kwargs, to_timm_state_dict

    if output.suffix.lower() != ".safetensors":
        raise VitlabError(f"{path_label(output)}: write timm's state dict as a .safetensors file")
    check_output(output, force)
    model = load(checkpoint)
    kwargs = timm_kwargs(model.spec, registry=model.registry)
    cls = timm_class(model.spec, registry=model.registry)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in to_timm_state_dict(model).items()}
    from safetensors.torch import save_file

    atomic_write(output, lambda tmp: save_file(tensors, str(tmp)), force=force)
    import timm

    name = model.spec.name if timm.is_model(model.spec.name) else None
    click.echo(f"wrote {path_label(output)}", err=True)
    click.echo(f"timm class: {cls.__module__}.{cls.__qualname__}")
    click.echo(f"timm.create_model({(name or '<any ' + cls.__name__ + ' name>')!r}, pretrained=False, "
               f"checkpoint_path={str(output)!r}, **{kwargs!r})")
