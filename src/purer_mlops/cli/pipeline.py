"""The pipeline's stages as commands (prepare, filelist, pretrain, metatrain, metatest, compare), each
parsing its options and calling its runner in :mod:`purer_mlops.stages`."""

from __future__ import annotations

from pathlib import Path

import click

from ..paths import Project
from .options import echo_json, load, stage_command


def register(cli: click.Group) -> None:
    """Add the stage commands to ``cli``."""
    for command in (prepare, filelist, pretrain, metatrain, metatest, compare):
        cli.add_command(command)


@stage_command
@click.option("--dataset", default=None, help="Prepare this dataset instead of params' `dataset` "
              "(e.g. extra pool_datasets).")
def prepare(project: Project, params_path: Path | None, quiet: bool, dataset: str | None) -> None:
    """Lay out the dataset in the seed's folder form.

    Reads params `dataset`, `glyphs` and, for real datasets and `folder` (your own images in the
    seed's layout), data/raw/ (see README).
    Writes data/<dataset>/meta_{train,val,test}/<class>/<image>; `glyphs` is generated.
    """
    from ..stages.prepare import prepare as run

    echo_json(run(load(project, params_path), project, dataset, progress=not quiet))


@stage_command
@click.option("--dataset", default=None, help="Write the filelists of this dataset instead.")
def filelist(project: Project, params_path: Path | None, quiet: bool, dataset: str | None) -> None:
    """Write the filelists data/<dataset>/split/{meta_train,meta_val,meta_test}.csv.

    Reads data/<dataset>/meta_*/ and params `dataset`, `folder`. Rows `filename,label` are sorted;
    also writes the class/image counts to results/data/<dataset>.json. For `folder` (your own
    images) also data/folder/split/normalisation.json: its image size and normalisation, the
    latter computed from its meta-train images unless `folder.mean`/`folder.std` give it.
    """
    from ..stages.filelists import filelist as run

    echo_json(run(load(project, params_path), project, dataset, progress=not quiet))


@stage_command
def pretrain(project: Project, params_path: Path | None, quiet: bool) -> None:
    """Train the teacher pool.

    Reads data/<d>/ for d in `pool_datasets` (default: `dataset`) and params `pre_backbone`,
    `pool_mode`, `APInum`, `way_pretrain`, `seed`, `pretrain.*`. Writes models/teachers/
    (one safetensors file per teacher + pool.json), results/pretrain/metrics.json (teacher_mean,
    teacher_worst) and details.json (per teacher; printed).
    """
    from ..stages.pretrain import main

    metrics = main(load(project, params_path), project, progress=not quiet)
    if metrics:  # rank 0 of torchrun's, or the only process
        echo_json(metrics)


@stage_command
@click.option("--oracle", is_flag=True, help="Meta-train on the real meta-train images (upper bound).")
def metatrain(project: Project, params_path: Path | None, quiet: bool, oracle: bool) -> None:
    """Meta-train the PURER meta-model (ECI; EI with `eci: false`).

    Reads models/teachers/, data/<dataset>/ (meta_val for model selection) and the
    meta-training params. Writes models/meta/ (best.safetensors chosen on meta-val,
    last.pt to resume) and results/metatrain/ (metrics.json: val_best, val_final; details.json,
    printed; train.csv, val.csv, bank.png).
    An interrupted run resumes from models/meta/last.pt when re-run with the same params.
    """
    from ..stages.metatrain import main

    metrics = main(load(project, params_path), project, oracle=oracle, progress=not quiet)
    if metrics:  # rank 0 of torchrun's, or the only process
        echo_json(metrics)


@stage_command
def metatest(project: Project, params_path: Path | None, quiet: bool) -> None:
    """Meta-test the selected meta-model on fixed, seeded real tasks.

    Reads models/meta/best.*, data/<dataset>/ (meta_test) and params `way_test`, `num_sup_test`,
    `num_qur_test`, `episode_test`, `test_inner_update_num`, `icfil`, `calibration.*`,
    `metatest.seed`. Writes results/metatest/metrics.json (test_acc, test_ci in percent,
    test_proto(_ci) for the nearest-prototype head, test_icfil(_ci) when `icfil` is on),
    details.json (printed: accuracy, ci95; under `prototype` the second head with its paired
    difference; ICFIL gain with its paired interval; the reference code's
    best-test-over-checkpoints number, labelled) and results/metatest/per_task.csv.
    """
    from ..stages.metatest import main

    echo_json(main(load(project, params_path), project, progress=not quiet))


@stage_command
def compare(project: Project, params_path: Path | None, quiet: bool) -> None:
    """Build the comparison table: `compare.methods` × `compare.shots` on shared test tasks.

    Methods: meta-models (random, average, ei, purer, purer+icfil, oracle; each also with a
    `<method>+proto` row, nearest prototype on its embedding) and the teachers' embeddings
    (teacher-best, teacher-mean, teachers-ensemble). Restrict the rows with a params file
    whose `compare.methods` lists fewer.

    Reads models/teachers/, models/meta/ (reused for the matching PURER row), data/<dataset>/
    and the meta-training and meta-testing params. Trains what is missing into
    models/compare/ and writes results/compare/compare.{json,md,png} and paired.json.
    """
    from ..stages.compare import main

    result = main(load(project, params_path), project, progress=not quiet)
    click.echo((project.results("compare") / "compare.md").read_text())
    click.echo(f"wall time: {result['wall_seconds']} s")
