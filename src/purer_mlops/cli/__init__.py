"""The ``purer`` command line: one subcommand per pipeline stage, a thin layer over the modules.

Every subcommand reads ``params.yaml`` (``--params``) relative to the project root (``--root``),
validates it before touching anything, and turns any :class:`UserError` into one line on
stderr and exit code 2. :mod:`.pipeline` holds the pipeline's stages, :mod:`.tools` the
commands around them (presets, parameters, teacher import).
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

import click

from ..errors import UserError
from ..interrupts import treat_sigterm_as_ctrl_c
from .options import cli
from .pipeline import register as register_stages
from .tools import register as register_tools
from .use import register as register_use

register_stages(cli)
register_tools(cli)
register_use(cli)


def main() -> None:
    """Console entry point: user errors → one line on stderr, exit code 2; Ctrl-C and SIGTERM →
    what was saved, exit code 128 + the signal's number."""
    treat_sigterm_as_ctrl_c()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as err:
        if isinstance(err.__cause__, KeyboardInterrupt):  # click turns Ctrl-C (and SIGTERM) into Abort
            _interrupted(err.__cause__)
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:
        _interrupted(err)


def _interrupted(err: KeyboardInterrupt) -> NoReturn:
    """Say which signal stopped the command and what it saved; exit 128 + the signal's number."""
    signum = getattr(err, "signum", signal.SIGINT)
    saved = getattr(err, "saved", "")
    click.echo(f"interrupted by {signal.Signals(signum).name}" + (f": {saved}." if saved else "."), err=True)
    sys.exit(128 + signum)


__all__ = ["cli", "main"]
