"""Commands around the pipeline: teacher import, the seed's presets, the parameters, the MLflow UI,
summaries over seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..config import Params
from ..errors import UserError
from ..paths import Project
from .options import PARAMS, ROOT, read_params


def register(cli: click.Group) -> None:
    """Add the tool commands to ``cli``."""
    for command in (teachers, preset, show_params, ui, summarize):
        cli.add_command(command)


@click.group()
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
                    project: Project) -> None:
    """Turn a folder of PyTorch state dicts into a pool.

    Reads SOURCE/*.pt(h) with torch.load(weights_only=True) only (never unpickles code), in
    our layout or the PURER reference code's (conv4, ResNet10/18), and the class names of
    ROOT/data/<dataset>/split/meta_train.csv; writes OUT/teacher_*.safetensors and
    OUT/pool.json. See docs/teachers.md.
    """
    from ..teachers.importer import import_pool

    out = out or project.teachers
    records = import_pool(source, manifest, out, root=project.root, dataset=dataset)
    click.echo(f"imported {len(records)} teachers into {out}")


@click.command()
@click.argument("name", required=False)
@click.option("--run", "run_it", is_flag=True, help="Run it now as a DVC experiment named NAME.")
def preset(name: str | None, run_it: bool) -> None:
    """The seed's scripts as parameter sets: list them, show one, or run it.

    \b
    purer preset                      list the presets
    purer preset cifar_51_conv4       print the `dvc exp run` command it stands for
    purer preset cifar_51_conv4 --run run that command (a DVC experiment named after it)
    """
    import os
    import shlex
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
        # dvc replaces this process (no child to outlive a killed parent); it prints and exits as itself
        sys.stdout.flush()
        os.execvp(cmd[0], cmd)


@click.command("params")
@ROOT
@PARAMS
@click.option("--markdown", is_flag=True, help="Print docs/parameters.md (every knob: default, meaning, stages).")
@click.option("--check", "checked", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Only validate, and write this marker file (the pipeline's first stage: a bad value stops "
                   "`dvc repro` / `dvc exp run` before any stage replaces its outputs).")
def show_params(project: Project, params_path: Path | None, markdown: bool, checked: Path | None) -> None:
    """Validate params.yaml and print every parameter (flattened) with its value and meaning."""
    from ..config.derived import all_knobs, parameters_markdown

    if markdown:
        click.echo(parameters_markdown(), nl=False)
        return
    if checked is not None:
        check_params(project, params_path, checked)
        return
    params = read_params(project, params_path)
    knobs = all_knobs()
    for key, value in params.flat().items():
        click.echo(f"{key}: {value}  # {knobs[key][0].help}")


def check_params(project: Project, params_path: Path | None, marker: Path) -> None:
    """Validate the parameters; write ``marker`` (always the same bytes, so the stages that depend
    on it re-run only for their own parameters) or stop, saying how to get the committed values back."""
    from ..fileio import write_json

    try:
        read_params(project, params_path)
    except UserError as err:
        # Not `git checkout params.yaml`: after a failed `dvc exp run -S` git may see the file as
        # unchanged (its index entry re-stamped) and restore nothing.
        raise UserError(f"{err} No stage ran and no output was replaced; fix the value, or restore the committed "
                        "file with `git show HEAD:params.yaml > params.yaml`.") from None
    write_json(marker, {"params.yaml": "valid"})


@click.command()
@ROOT
@PARAMS
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
def ui(project: Project, params_path: Path | None, host: str, port: int) -> None:
    """`mlflow ui` on the project's store; prints the address that opens the experiment
    (experiment_name) in the model-training view, which MLflow 3.17 does not pick by itself."""
    import os

    from mlflow import MlflowClient

    from ..tracking.store import tracking_uri, ui_address

    params = read_params(project, params_path)
    uri = tracking_uri(project.root)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"the store is the MLflow server at {uri}, which serves its own UI: open "
                        f"{ui_address(uri, None)} (or unset MLFLOW_TRACKING_URI for the project's mlflow.db).")
    experiment = MlflowClient(uri).get_experiment_by_name(params.experiment_name)
    address = ui_address(f"http://{host}:{port}", experiment.experiment_id if experiment else None)
    click.echo(f"MLflow UI, experiment {params.experiment_name!r} as model training: open {address}", err=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # mlflow replaces this process: no child to outlive it


FILE = click.Path(dir_okay=False, path_type=Path)


@click.command()
@click.argument("run_folders", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@ROOT
@click.option("--reference", default=None, metavar="KEY=VALUE[,...]",
              help="The setting the others are compared with, paired by seed (e.g. adv_scale=10).")
@click.option("--markdown", "markdown_path", type=FILE, default=None, help="Also write the table as Markdown.")
@click.option("--csv", "csv_path", type=FILE, default=None, help="Also write the unrounded numbers as CSV.")
@click.option("--plot", "plot_path", type=FILE, default=None,
              help="Also plot each setting (PNG): one dot per seed, the mean with its 95% interval.")
@click.option("--mlflow/--no-mlflow", "to_mlflow", default=True, show_default=True,
              help="Log the summary as a run of the project's MLflow experiment (when tracking is on).")
def summarize(run_folders: tuple[Path, ...], project: Project, reference: str | None, markdown_path: Path | None,
              csv_path: Path | None, plot_path: Path | None, to_mlflow: bool) -> None:
    """Compare the settings of DVC experiments (or of RUN_FOLDERS) over their seeds.

    Groups the finished experiments of `dvc exp show` by every parameter except `seed`; per
    setting: the number of seeds, the mean and 95% t-interval of meta-val (best) and meta-test
    accuracy and, with --reference, the difference to that setting paired by seed with its
    t-interval and p-value. Run a sweep first, e.g.
    `dvc exp run --queue -S 'adv_scale=0.5,10' -S 'seed=range(0,3)'` and `dvc queue start`.

    RUN_FOLDERS, when given, replace the DVC experiments: each is a project folder of one run
    (`purer metatrain --root FOLDER`, and `purer metatest --root FOLDER` if it ran), read from
    its params.yaml and results/*/metrics.json. A folder without meta-test shows n/a there:
    the way to choose a setting on meta-val without touching meta-test (docs/tracking.md).
    """
    from ..sweeps import summarize_experiments

    params = read_params(project, None)
    experiment = params.experiment_name if to_mlflow and params.tracking else None
    table, run_id = summarize_experiments(project.root, reference, folders=list(run_folders),
                                          markdown_path=markdown_path,
                                          csv_path=csv_path, plot_path=plot_path, experiment=experiment)
    click.echo(table, nl=False)
    if run_id:
        click.echo(f"logged to MLflow: experiment {experiment!r}, run {run_id}", err=True)
