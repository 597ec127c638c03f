"""The ``purer`` command line: one subcommand per pipeline stage, a thin layer over the modules.

Every subcommand reads ``params.yaml`` (``--params``) relative to the project root (``--root``),
validates it before touching anything, and turns any :class:`UserError` into one line on
stderr and exit code 2. :mod:`.stages` holds the pipeline's stages, :mod:`.tools` the
commands around them (presets, parameters, teacher import).
"""

from __future__ import annotations

import sys

import click

from ..errors import UserError
from .options import cli
from .stages import register as register_stages
from .tools import register as register_tools

register_stages(cli)
register_tools(cli)


def main() -> None:
    """Console entry point: user errors → one line on stderr, exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


__all__ = ["cli", "main"]
