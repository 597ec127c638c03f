"""The ``purer`` command line: one subcommand per pipeline stage, a thin layer over the modules.

Every subcommand reads ``params.yaml`` (``--params``) relative to the project root (``--root``),
validates it before touching anything, and turns any :class:`UserError` into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .config import Params, load_params
from .errors import UserError

ROOT = click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=".",
                    show_default=True, help="Project root (holds data/, models/, results/).")
PARAMS = click.option("--params", "params_path", type=click.Path(dir_okay=False, path_type=Path),
                      default=None, help="Parameter file [default: ROOT/params.yaml].")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")


def _load(root: Path, params_path: Path | None) -> Params:
    """Validate the parameters, then take the working copy's lock for the rest of the command."""
    params = load_params(params_path or root / "params.yaml")
    _lock_working_copy(root)
    return params


def _lock_working_copy(root: Path) -> None:
    """One stage at a time per working copy: a second one stops at once with a clear message.

    Two stages writing the same outputs would corrupt each other; separate copies (``dvc exp
    run --temp``/``--queue``) have separate locks. The lock is released when the process ends.
    """
    from filelock import FileLock, Timeout

    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds the lock for all ranks
        return
    lock = FileLock(str(Path(root) / ".purer.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout as err:
        raise UserError(f"another `purer` stage is running in {Path(root).resolve()} (lock "
                        f"{lock.lock_file}); wait for it to finish, or run experiments in separate "
                        "copies with `dvc exp run --temp` or `--queue`.") from err
    _HELD_LOCKS.append(lock)


_HELD_LOCKS: list = []  # kept referenced so the locks live as long as the command


def _echo_json(obj: dict) -> None:
    import json

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
    """


@cli.command()
@ROOT
@PARAMS
@QUIET
@click.option("--dataset", default=None, help="Prepare this dataset instead of params' `dataset` "
              "(e.g. extra pool_datasets).")
def prepare(root: Path, params_path: Path | None, quiet: bool, dataset: str | None) -> None:
    """Lay out the dataset in the seed's folder form.

    Reads params `dataset`, `glyphs` and, for real datasets, data/raw/ (see README).
    Writes data/<dataset>/meta_{train,val,test}/<class>/<image>; `glyphs` is generated.
    """
    from .data.stages import prepare as run

    _echo_json(run(_load(root, params_path), root, dataset, progress=not quiet))


@cli.command()
@ROOT
@PARAMS
@click.option("--dataset", default=None, help="Write the filelists of this dataset instead.")
def filelist(root: Path, params_path: Path | None, dataset: str | None) -> None:
    """Write the filelists data/<dataset>/split/{meta_train,meta_val,meta_test}.csv.

    Reads data/<dataset>/meta_*/ and param `dataset`. Rows `filename,label` are sorted;
    also writes the class/image counts to results/data/<dataset>.json.
    """
    from .data.stages import filelist as run

    _echo_json(run(_load(root, params_path), root, dataset))


@cli.command()
@ROOT
@PARAMS
@QUIET
def pretrain(root: Path, params_path: Path | None, quiet: bool) -> None:
    """Train the teacher pool.

    Reads data/<d>/ for d in `pool_datasets` (default: `dataset`) and params `pre_backbone`,
    `pool_mode`, `APInum`, `way_pretrain`, `seed`, `pretrain.*`. Writes models/teachers/
    (one safetensors file per teacher + pool.json) and results/pretrain/metrics.json.
    """
    from .distributed import pick_device, setup, teardown
    from .teachers.pretrain import run

    params = _load(root, params_path)
    ranks = setup()  # teachers split across ranks under torchrun
    try:
        metrics = run(params, root, progress=not quiet, device=pick_device(params.device), ranks=ranks)
        if ranks.is_main:
            _echo_json(metrics)
    finally:
        teardown(ranks)


@cli.group()
def teachers() -> None:
    """Manage the teacher pool (import models trained elsewhere)."""


@teachers.command("import")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML/JSON listing each model's file, architecture, dataset and classes; or a short "
                   "one (dataset, class_order) for a folder of the reference code's model_<i>.pth.")
@click.option("--dataset", default=None,
              help="Instead of a manifest: SOURCE is the reference's model_<i>.pth of this dataset.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Pool folder to write [default: ROOT/models/teachers].")
@ROOT
def teachers_import(source: Path, manifest: Path | None, dataset: str | None, out: Path | None,
                    root: Path) -> None:
    """Turn a folder of PyTorch state dicts into a pool.

    Reads SOURCE/*.pt(h) with torch.load(weights_only=True) only (never unpickles code), in
    our layout or the PURER reference code's (conv4, ResNet10/18), and the class names of
    ROOT/data/<dataset>/split/meta_train.csv; writes OUT/teacher_*.safetensors and
    OUT/pool.json. See docs/teachers.md.
    """
    from .teachers.importer import import_pool

    out = out or root / "models" / "teachers"
    records = import_pool(source, manifest, out, root=root, dataset=dataset)
    click.echo(f"imported {len(records)} teachers into {out}")


@cli.command()
@ROOT
@PARAMS
@QUIET
@click.option("--oracle", is_flag=True, help="Meta-train on the real meta-train images (upper bound).")
def metatrain(root: Path, params_path: Path | None, quiet: bool, oracle: bool) -> None:
    """Meta-train the PURER meta-model (ECI; EI with `eci: false`).

    Reads models/teachers/, data/<dataset>/ (meta_val for model selection) and the
    meta-training params. Writes models/meta/ (best.safetensors chosen on meta-val,
    last.pt to resume) and results/metatrain/ (metrics.json, train.csv, val.csv, bank.png).
    An interrupted run resumes from models/meta/last.pt when re-run with the same params.
    """
    from .distributed import setup, teardown
    from .meta.train import run
    from .tracking import Tracker, open_tracker

    params = _load(root, params_path)
    ranks = setup()  # several processes under torchrun; one otherwise
    try:
        if not ranks.is_main:
            run(params, root, oracle=oracle, progress=False, tracker=Tracker(), ranks=ranks)
            return
        with open_tracker(params, "metatrain", root) as tracker:
            _echo_json(run(params, root, oracle=oracle, progress=not quiet, tracker=tracker, ranks=ranks))
    finally:
        teardown(ranks)


@cli.command()
@ROOT
@PARAMS
@QUIET
def metatest(root: Path, params_path: Path | None, quiet: bool) -> None:
    """Meta-test the selected meta-model on fixed, seeded real tasks.

    Reads models/meta/best.*, data/<dataset>/ (meta_test) and params `way_test`, `num_sup_test`,
    `num_qur_test`, `episode_test`, `test_inner_update_num`, `icfil`, `calibration.*`,
    `metatest.seed`. Writes results/metatest/metrics.json (accuracy, ci95 in percent; ICFIL
    gain with its paired interval when `icfil` is on; the reference code's best-test-over-
    checkpoints number, labelled) and results/metatest/per_task.csv.
    """
    from .meta.metatest import run
    from .tracking import open_tracker

    params = _load(root, params_path)
    with open_tracker(params, "metatest", root) as tracker:
        _echo_json(run(params, root, progress=not quiet, tracker=tracker))


@cli.command()
@ROOT
@PARAMS
@QUIET
def compare(root: Path, params_path: Path | None, quiet: bool) -> None:
    """Build the comparison table: `compare.methods` × `compare.shots` on shared test tasks.

    Reads models/teachers/, models/meta/ (reused for the matching PURER row), data/<dataset>/
    and the meta-training and meta-testing params. Trains what is missing into
    models/compare/ and writes results/compare/compare.{json,md,png} and paired.json.
    """
    from .compare import run
    from .tracking import open_tracker

    params = _load(root, params_path)
    with open_tracker(params, "compare", root) as tracker:
        result = run(params, root, progress=not quiet, tracker=tracker)
    click.echo((root / "results" / "compare" / "compare.md").read_text())
    click.echo(f"wall time: {result['wall_seconds']} s")


@cli.command()
@click.argument("name", required=False)
@click.option("--run", "run_it", is_flag=True, help="Run it now as a DVC experiment named NAME.")
def preset(name: str | None, run_it: bool) -> None:
    """The seed's scripts as parameter sets: list them, show one, or run it.

    \b
    purer preset                      list the presets
    purer preset cifar_51_conv4       print the `dvc exp run` command it stands for
    purer preset cifar_51_conv4 --run run that command (a DVC experiment named after it)
    """
    import shlex
    import subprocess
    from importlib.resources import files

    import yaml

    folder = files("purer_mlops") / "presets"
    names = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
    if name is None:
        for n in names:
            first = (folder / f"{n}.yaml").read_text().splitlines()[0].lstrip("# ")
            click.echo(f"{n:18s} {first}")
        return
    if name not in names:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(names)}.")
    values = yaml.safe_load((folder / f"{name}.yaml").read_text())
    Params().replace(**values)  # validated like params.yaml
    sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    cmd = ["dvc", "exp", "run", "-n", name] + [a for kv in sets for a in ("-S", kv)]
    click.echo(shlex.join(cmd))
    if run_it:
        sys.exit(subprocess.call(cmd))


@cli.command("params")
@ROOT
@PARAMS
def show_params(root: Path, params_path: Path | None) -> None:
    """Validate params.yaml and print every parameter (flattened) with its value."""
    params = load_params(params_path or root / "params.yaml")
    for key, value in params.flat().items():
        click.echo(f"{key}: {value}")


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
