"""The command group and the options every stage shares (project root, parameter file, quiet)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import click

from ..config import Params, load_params
from ..errors import UserError
from ..paths import Project

ROOT = click.option("--root", "project", type=click.Path(file_okay=False, path_type=Path), default=".",
                    show_default=True, callback=lambda _ctx, _param, value: Project(value),
                    help="Project root (holds data/, models/, results/).")
PARAMS = click.option("--params", "params_path", type=click.Path(dir_okay=False, path_type=Path),
                      default=None, help="Parameter file [default: ROOT/params.yaml].")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")

_HELD_LOCKS: list = []  # kept referenced so the locks live as long as the command


def read_params(project: Project, params_path: Path | None) -> Params:
    """The validated parameters of ``--params``, else the project's ``params.yaml``."""
    return load_params(params_path or project.params_file)


def load(project: Project, params_path: Path | None) -> Params:
    """Validate the parameters, then take the working copy's lock for the rest of the command."""
    params = read_params(project, params_path)
    lock_working_copy(project)
    return params


def lock_working_copy(project: Project) -> None:
    """One stage at a time per working copy: a second one stops at once with a clear message.

    Two stages writing the same outputs would corrupt each other; separate copies (``dvc exp
    run --temp``/``--queue``) have separate locks. The lock is released when the process ends.
    """
    from filelock import FileLock, Timeout

    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds the lock for all ranks
        return
    lock = FileLock(str(project.stage_lock))
    try:
        lock.acquire(timeout=0)
    except Timeout as err:
        raise UserError(f"another `purer` stage is running in {project.root.resolve()} (lock "
                        f"{lock.lock_file}); wait for it to finish, or run experiments in separate "
                        "copies with `dvc exp run --temp` or `--queue`.") from err
    except OSError as err:  # a read-only project, or the lock's path taken by a folder
        raise UserError(f"cannot create the working-copy lock {lock.lock_file} ({err.strerror or err}): a stage "
                        "writes its outputs in the project, so make the folder writable (or run in a copy).") from err
    _HELD_LOCKS.append(lock)


def echo_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="purer-mlops")
def cli() -> None:
    """PURER data-free meta-learning as a reproducible pipeline.

    \b
    Stages, in pipeline order (dvc.yaml runs them for you with `dvc repro`):
      prepare    data/<dataset>/{meta_train,meta_val,meta_test}/<class>/<image>
      filelist   data/<dataset>/split/*.csv
      pretrain   models/teachers/ (the teacher pool)
      metatrain  models/meta/ (PURER meta-model), results/metatrain/
      metatest   results/metatest/
      compare    results/compare/ (baselines × shots table)

    \b
    Using the meta-model (docs/adapt.md):
      adapt      SUPPORT/<class>/<image> + QUERY/ → predictions.csv
    """


def stage_command(fn: Callable) -> click.Command:
    """A pipeline stage's command, with the options every stage shares: --root, --params, --quiet."""
    return click.command()(ROOT(PARAMS(QUIET(fn))))
