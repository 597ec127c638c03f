"""Opening a stage's MLflow run: its name, tags, params and inputs, and its parent run."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..paths import Project
from .inputs import log_inputs
from .liveness import TAG_PROCESS, close_dead_runs, this_process
from .outputs import READS_META_MODEL, meta_model_file, sha256
from .store import TrackingError, check_server, open_experiment, root_cause, store_root, tracking_uri
from .tracker import (
    MLFLOW_PARENT,
    TAG_BASELINE,
    TAG_COMMIT,
    TAG_EXP,
    TAG_MODEL,
    TAG_PARENT,
    TAG_STAGE,
    MlflowTracker,
    Tracker,
    ending,
)


def scenario(params: Any) -> str:
    """PURER's scenario: SS (one dataset, one architecture), SH (mixed), MH (several datasets)."""
    if len(params.teacher_datasets) > 1:
        return "MH"
    return "SH" if params.pre_backbone == "mix" else "SS"


def run_name(params: Any, stage: str) -> str:
    """The DVC experiment's name when DVC runs one, else a name that says what was run."""
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return exp if stage == "metatrain" else f"{exp}-{stage}"
    return (f"{stage}-{params.dataset}-{params.meta_learner}-{params.way_train}w"
            f"{params.num_sup_train}s-adv{params.adv_scale:g}")


def git_commit(root: Path) -> str | None:
    """``git rev-parse HEAD`` in ``root``; None outside a git repository or without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _parent_run(client: Any, experiment_id: str, root: Path, commit: str | None) -> str | None:
    """The meta-training run behind the meta-model in ``root``: same DVC experiment, else the
    run that wrote this exact model file, else the latest one at the same commit."""
    filters = []
    if os.environ.get("DVC_EXP_NAME"):
        filters.append(f"tags.`{TAG_EXP}` = '{os.environ['DVC_EXP_NAME']}'")
    model = meta_model_file(Project(root))
    if model.is_file():
        filters.append(f"tags.`{TAG_MODEL}` = '{sha256(model)}'")
    if commit:
        filters.append(f"tags.`{TAG_COMMIT}` = '{commit}'")
    for condition in filters:
        runs = client.search_runs([experiment_id], max_results=1, order_by=["start_time DESC"],
                                  filter_string=f"tags.`{TAG_STAGE}` = 'metatrain' and {condition}")
        if runs:
            return runs[0].info.run_id
    return None


def _log_inputs(tracker: MlflowTracker, params: Any, stage: str) -> None:
    """The run's params, ``params.yaml`` and ``dvc.lock`` as artifacts (writing them proves the
    artifact store is writable), its dataset inputs with their DVC hashes; the system metrics
    monitor when ``tracking_system_metrics`` asks for it."""
    from mlflow.entities import Param

    flat = [Param(k, str(v)) for k, v in params.flat().items()]
    for i in range(0, len(flat), 100):  # log_batch takes at most 100 params
        tracker.client.log_batch(tracker.run_id, params=flat[i:i + 100])
    project = Project(tracker.root)
    for path in (project.params_file, project.dvc_lock):
        if path.is_file():
            tracker.log_artifact(path)
    log_inputs(tracker.client, tracker.run_id, project, params, stage)
    if params.tracking_system_metrics:
        tracker.monitor_system()


def _start_run(params: Any, stage: str, root: Path) -> MlflowTracker:
    """Open the store, the experiment and a new run, logging params and inputs: any failure is
    a :class:`TrackingError` raised before the stage does any work."""
    uri = tracking_uri(root)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    # MLflow logs a store error with its whole traceback before raising it; the one line below says it all.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    remote = uri.startswith(("http://", "https://", "databricks"))
    if uri.startswith(("http://", "https://")):
        check_server(uri, params.experiment_name)
    # A local store keeps artifacts at the store root, even when the run works in a temp copy.
    artifacts = None if remote else Path(store_root(root), "mlruns").resolve().as_uri()
    commit = git_commit(root)
    tags = {
        TAG_STAGE: stage,
        "stage": os.environ.get("DVC_STAGE") or stage,
        "dataset": params.dataset,
        "scenario": scenario(params),
        "meta_learner": params.meta_learner,
        "seed": str(params.seed),  # a string: seed 0 is kept (falsy tags are left out); the runs table groups by it
        TAG_EXP: os.environ.get("DVC_EXP_NAME"),
        TAG_BASELINE: os.environ.get("DVC_EXP_BASELINE_REV"),
        TAG_COMMIT: commit,
        TAG_PROCESS: this_process(),
    }
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment_id = open_experiment(client, params.experiment_name, artifacts)
        close_dead_runs(client, experiment_id)
        if stage in READS_META_MODEL:
            parent = _parent_run(client, experiment_id, root, commit)
            tags.update({TAG_PARENT: parent, MLFLOW_PARENT: parent})
        run = client.create_run(experiment_id, run_name=run_name(params, stage),
                                tags={k: str(v) for k, v in tags.items() if v})
        tracker = MlflowTracker(client, run.info.run_id, root)
        _log_inputs(tracker, params, stage)
    except (MlflowException, SQLAlchemyError, OSError) as err:
        raise TrackingError(
            f"cannot log to the MLflow store {uri}: {root_cause(err)}. Fix the store or its folder, unset "
            "MLFLOW_TRACKING_URI to use mlflow.db at the repository root, or set tracking: false."
        ) from err
    return tracker


@contextmanager
def open_tracker(params: Any, stage: str, root: Path) -> Iterator[Tracker]:
    """The tracker of one run of ``stage`` in the project ``root``.

    ``tracking: false`` gives the no-op :class:`Tracker`. Otherwise the MLflow run starts
    here (a broken store raises :class:`TrackingError` before the stage starts) and ends when
    the block does: on success after logging the stage's outputs (:func:`stage_artifacts`,
    :func:`stage_metrics`), else marked FAILED (KILLED on Ctrl-C).
    """
    if not params.tracking:
        yield Tracker()
        return
    tracker = _start_run(params, stage, Path(root))
    with ending(tracker):
        yield tracker
        tracker.log_stage_outputs(stage)


