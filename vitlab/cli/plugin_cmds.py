"""Commands for plugin authors and editors: ``plugins``, ``new-plugin``, ``schema``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..kinds import KINDS
from ..errors import VitlabError, path_label
from . import cli
from .output import console as _console


def _plugin_report() -> dict:
    """Every plugin's state: loaded (with what it registered), failed (with the reason), disabled,
    and component names that two plugins register (ambiguous: neither is usable)."""
    from .. import plugins as P

    # its own lenient load, so that the listing reads VITLAB_DISABLE_PLUGINS as it is now
    _, registry = P.make_plugin_manager(strict=False)
    ambiguous = registry.ambiguous()
    return {
        "plugins": [
            {"name": p.name, "distribution": p.distribution, "version": p.version, "value": p.value,
             "components": [{"kind": k, "name": n} for k, n in p.components],
             "ambiguous": [{"kind": k, "name": n} for k, n in p.components if (k, n) in ambiguous]}
            for p in sorted(registry.plugins, key=lambda p: (p.distribution, p.name))
        ],
        "failures": [{"name": f.name, "distribution": f.distribution, "reason": f.reason} for f in registry.failures],
        "disabled": [{"name": d.name, "distribution": d.distribution, "version": d.version, "value": d.value}
                     for d in registry.disabled],
        "ambiguous": [{"kind": k, "name": n, "providers": [i.provider for i in infos]}
                      for (k, n), infos in sorted(ambiguous.items())],
        "op_conflicts": [{"op": op, "providers": [r.provider for r in rules], "default": rules[0].provider}
                         for op, rules in sorted(registry.op_conflicts().items())],
        "warnings": registry.warnings(),
        "builtin_components": sum(1 for c in registry.components() if c.provider == P.BUILTIN),
    }


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def plugins_cmd(as_json: bool) -> None:
    """Installed plugin distributions, their versions, what each registers, and any that failed
    to load (with the reason) or register a name another plugin registers too.
    VITLAB_DISABLE_PLUGINS=1 or =name,... skips plugins."""
    report = _plugin_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    if report["plugins"]:
        table = Table(title="vitlab plugins")
        for col in ("distribution", "version", "entry point", "components registered"):
            table.add_column(col, overflow="fold")
        for p in report["plugins"]:
            clashes = {(c["kind"], c["name"]) for c in p["ambiguous"]}
            comps = ", ".join(
                f"{c['kind']} {c['name']}" + (" (ambiguous)" if (c["kind"], c["name"]) in clashes else "")
                for c in p["components"]
            ) or "(none)"
            table.add_row(*(escape(v) for v in (p["distribution"], p["version"], f"{p['name']} = {p['value']}", comps)))
        console.print(table)
    else:
        console.print("no external plugins loaded")
    console.print(f"built-in: vitlab ({report['builtin_components']} components)")
    if report["disabled"]:
        names = ", ".join(f"{d['distribution']} ({d['name']})" for d in report["disabled"])
        console.print(escape(f"disabled by VITLAB_DISABLE_PLUGINS: {names}"))
    for a in report["ambiguous"]:
        console.print(escape(
            f"ambiguous: {a['kind']} '{a['name']}' is registered by {' and by '.join(a['providers'])}; "
            f"recipes that select it fail until VITLAB_DISABLE_PLUGINS names one of them"
        ))
    for c in report["op_conflicts"]:
        console.print(escape(
            f"FLOPs of {c['op']} are declared by {' and by '.join(c['providers'])}: each counts it inside "
            f"its own components, {c['default']} everywhere else"
        ))
    if report["failures"]:
        table = Table(title="plugins that failed to load", title_style="bold red")
        for col in ("entry point", "distribution", "reason"):
            table.add_column(col, overflow="fold")
        for f in report["failures"]:
            table.add_row(escape(f["name"]), escape(f["distribution"]), escape(f["reason"]))
        console.print(table)


@cli.command("new-plugin")
@click.argument("name")
@click.option("--kind", "-k", required=True, type=click.Choice(KINDS), help="The component kind the plugin provides.")
@click.option("--output", "-o", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory to create (default: ./NAME). Must not exist or be empty.")
def new_plugin(name: str, kind: str, output: Path | None) -> None:
    """Scaffold a plugin package (distribution vitlab-NAME) providing a KIND named NAME: entry
    point, component skeleton with Params, a recipe and a test that pass as generated."""
    from ..plugins import load_registry
    from ..scaffold import PluginNames, scaffold

    written = scaffold(name, kind, output, registry=load_registry())
    n = PluginNames.of(name, kind)
    root = output if output is not None else Path(name)
    click.echo(f"created {n.dist} in {path_label(root)}/ ({kind} '{n.component}', entry point {n.entry_point} = {n.module})")
    for path in written:
        click.echo(f"  {path.relative_to(root).as_posix()}")
    click.echo("next:")
    click.echo(f"  pip install -e {path_label(root)}")
    click.echo(f"  pytest {path_label(root)}")


@cli.command("schema")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to FILE instead of stdout.")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def schema_cmd(output: Path | None, force: bool) -> None:
    """JSON Schema (draft 2020-12) of the recipe format with every installed component's params,
    selected by name, for editors that complete YAML."""
    from ..fileio import atomic_write, check_output
    from ..plugins import load_registry
    from ..schema import recipe_schema

    if output is not None:
        check_output(output, force)  # a bad output path fails before the schema (every plugin) is built
    text = json.dumps(recipe_schema(load_registry()), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        atomic_write(output, text, force=force)
    except OSError as exc:
        raise VitlabError(f"cannot write {path_label(output)}: {exc.strerror or exc}") from None
    click.echo(f"wrote {path_label(output)}", err=True)
