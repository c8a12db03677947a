"""The ``vitlab`` command line. Commands live in modules of this package, one topic each.

Every ``VitlabError`` becomes its lines on stderr and exit code 2; nothing prints a traceback
unless ``VITLAB_DEBUG=1``.
"""
from __future__ import annotations

import os
import sys

import click

from ..errors import VitlabError

SET_HELP = "Override a recipe field: KEY=VALUE with a dotted key (depth=6, attention.params.qk_norm=true). Repeatable."


def set_option(f):
    """The ``--set KEY=VALUE`` option, shared by every command that reads recipes."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(f)


def fail(error: VitlabError) -> None:
    for line in error.lines():
        click.echo(f"error: {line}", err=True)
    sys.exit(error.exit_code)


class VitlabGroup(click.Group):
    """A click group that turns vitlab errors into one line each and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VitlabError as exc:
            fail(exc)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # an internal error: one line, traceback only on request
            if os.environ.get("VITLAB_DEBUG"):
                raise
            click.echo(f"error: internal error {type(exc).__name__}: {exc} (set VITLAB_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)


@click.group(cls=VitlabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitlab")
def cli() -> None:
    """Explore Vision Transformer architectures from YAML recipes."""


def main() -> None:
    load_commands()
    cli(prog_name="vitlab")


def load_commands() -> None:
    """Import the command modules; each registers its commands on ``cli``."""
    import importlib

    for name in ("spec_cmds", "analysis_cmds", "attention_cmds", "timm_cmds", "plugin_cmds", "bench_cmds"):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != f"{__name__}.{name}":
                raise
