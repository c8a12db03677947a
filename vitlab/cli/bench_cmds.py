"""``vitlab bench``: images/s, achieved GMAC/s and efficiency against the machine's matmul."""
from __future__ import annotations

import json

import click

from ..limits import MAX_BATCH
from ..errors import one_line
from . import cli, set_option


@cli.command()
@click.argument("recipe")
@set_option
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(min=1, max=MAX_BATCH))
@click.option("--train", is_flag=True, help="Time a training step (forward, backward, SGD) instead of inference.")
@click.option("--compile", "use_compile", is_flag=True, help="Run the model under torch.compile.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu).")
@click.option("--iters", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--measure", is_flag=True,
              help="Instead: median inference and training-step time and peak memory in a fresh process "
                   "(compare --measure's 'measured' object, next to the predicted memory).")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory the run may use (default: $VITLAB_MAX_MEMORY, else what the machine has available).")
def bench(recipe, overrides, batch_size, train, use_compile, device, iters, as_json, measure, max_memory) -> None:
    """Throughput of RECIPE's model and its efficiency relative to a large matmul."""
    import torch

    from ..analysis import analyze
    from ..bench import bench_model
    from ..recipes import build_model
    from ..recipes import load_spec

    spec = load_spec(recipe, overrides=list(overrides))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..measure import check_device

    torch_device = check_device(device)  # meta computes nothing: there is no time to report
    from ..analysis.memory import check_fits

    predicted = analyze(spec, batch_size=batch_size)
    need = predicted.memory["train_peak_bytes" if train or measure else "infer_peak_bytes"]
    check_fits(need, f"{spec.name} {'training' if train or measure else 'inference'} at batch {batch_size}",
               max_memory=max_memory, device=str(torch_device))
    if measure:
        from ..measure import measure_spec

        measured = measure_spec(spec, batch_size, device=str(torch_device), repeats=iters)
        out = {"name": spec.name, "measured": measured, "memory": predicted.memory}
        if as_json:
            click.echo(json.dumps(out, indent=2))
            return
        m = measured
        click.echo(f"{one_line(spec.name)} on {m['device']} at batch {m['batch_size']}: inference {m['infer_ms']:.1f} ms "
                   f"({m['infer_peak_bytes'] / 2**20:.1f} MiB peak), training step {m['train_step_ms']:.1f} ms "
                   f"({m['train_peak_bytes'] / 2**20:.1f} MiB peak; predicted "
                   f"{predicted.memory['train_peak_bytes'] / 2**20:.1f} MiB)" + (f"; {m['note']}" if "note" in m else ""))
        if "warning" in m:
            click.echo(f"warning: {one_line(spec.name)}: {m['warning']}", err=True)
        return
    macs = predicted.flops // batch_size
    model = build_model(spec, device=torch_device, seed=0)
    r = bench_model(model, macs, batch_size=batch_size, train=train, compile=use_compile, device=torch_device, iters=iters)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    click.echo(
        f"{one_line(r.name)}: {r.mode} batch {r.batch_size}{' compiled' if r.compiled else ''} on {r.device}: "
        f"{r.images_per_s:.1f} images/s, {r.achieved_gmacs:.1f} GMAC/s achieved, "
        f"matmul {r.matmul_gmacs:.1f} GMAC/s, efficiency {r.efficiency:.2f}"
    )
