"""The ``vitlab`` command line. Commands live in modules of this package, one topic each.

Every ``VitlabError`` becomes its lines on stderr and exit code 2, and so does every usage error
(a missing argument, an unknown option or choice): one ``error: ...`` line each. Nothing prints a
traceback unless ``VITLAB_DEBUG=1``.
"""
from __future__ import annotations

import os
import sys

import click

from ..errors import VitlabError, is_out_of_memory, one_line

SET_HELP = "Override a recipe field: KEY=VALUE with a dotted key (depth=6, attention.params.qk_norm=true). Repeatable."


def set_option(f):
    """The ``--set KEY=VALUE`` option, shared by every command that reads recipes."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(f)


def fail(error: VitlabError) -> None:
    for line in error.lines():  # each problem one line, whatever names and values it quotes
        click.echo(f"error: {one_line(line)}", err=True)
    sys.exit(error.exit_code)


# click >= 8.2 raises this (a UsageError) for a group run without a command; older click prints help
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def usage_line(exc: click.UsageError) -> str:
    """click's usage error as one line, with where to look: click prints the usage, a hint and the
    error on three lines, which reads as three problems to scripts that count lines."""
    message = one_line(exc.format_message()).rstrip(".")
    message = message[:1].lower() + message[1:] if message[1:2].islower() else message
    command = exc.ctx.command_path if exc.ctx is not None else "vitlab"
    return f"error: {message} (see '{command} --help')"


class VitlabGroup(click.Group):
    """A click group that turns vitlab errors and usage errors into one line each and exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:  # the caller handles exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            # click's own handling prints usage errors on three lines: take the exceptions instead
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # bare ``vitlab``: the help is the answer, not an error line
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            click.echo(usage_line(exc), err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:  # e.g. a file click could not open
            click.echo(f"error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:  # Ctrl-C or end of input while click was parsing
            click.echo("aborted", err=True)
            sys.exit(1)
        except VitlabError as exc:  # raised while parsing (a parameter callback), before invoke
            fail(exc)
        # without standalone mode click returns the command's value, or the code of a ctx.exit()
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            from ..plugins import report_failures

            # a broken plugin costs only its own components: one warning line each, then the command
            report_failures(lambda line: click.echo(line, err=True))
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
            if is_out_of_memory(exc):  # the guard was lifted or wrong: the machine said no, not vitlab
                click.echo(f"error: out of memory: {one_line(str(exc))[:300]} (lower --batch-size, or use "
                           "--device meta / --method derived for counts)", err=True)
                sys.exit(1)
            # capped: a library's message can hold a whole tensor
            click.echo(f"error: internal error {type(exc).__name__}: {one_line(str(exc)[:300])} "
                       "(set VITLAB_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)


def _allow_extends_outside(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # read where recipes are loaded (``recipes.extends_outside_allowed``), and by --measure's children
        from ..recipes import ALLOW_EXTENDS_OUTSIDE

        os.environ[ALLOW_EXTENDS_OUTSIDE] = "1"


@click.group(cls=VitlabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitlab")
@click.option("--allow-extends-outside", is_flag=True, expose_value=False, is_eager=True,
              callback=_allow_extends_outside,
              help="Let a recipe's 'extends' name a file outside its own folder and the bundled recipes "
                   "(also VITLAB_ALLOW_EXTENDS_OUTSIDE=1).")
def cli() -> None:
    """Explore Vision Transformer architectures from YAML recipes."""


def main() -> None:
    from ..terminal import guard_std_streams

    guard_std_streams()  # no control character of a name or path reaches the terminal raw
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
