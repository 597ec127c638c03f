"""Experiment tracking: every stage run that opens a tracker becomes one MLflow run.

:class:`Tracker` is the no-op tracker (``tracking: false``); :class:`MlflowTracker` implements
the same methods. Stages only ever call these methods, through :func:`open_tracker`.

The store is ``sqlite:///<root>/mlflow.db`` with artifacts under ``<root>/mlruns``, ``root``
being ``DVC_ROOT`` when DVC sets it (queued and ``--temp`` experiments run in a temporary copy
that is deleted afterwards) and the project root otherwise; an explicit ``MLFLOW_TRACKING_URI``
wins. Runs are tagged with the DVC experiment, the git commit and the PURER scenario, and the
runs of stages that read the meta-model (``metatest``, ``compare``) are nested under the
meta-training run that produced it. See docs/tracking.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from .errors import UserError
from .paths import Project


class TrackingError(UserError):
    """The tracking store cannot be reached or written: the stage stops before it starts."""


class Tracker:
    """Does nothing: the tracker of runs with tracking turned off."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record scalar metrics at a step."""

    def log_image(self, path: Path, key: str, step: int) -> None:
        """Record an image file as step ``step`` of the series ``key``."""

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Attach a file to the run."""

    def log_metrics_file(self, path: Path) -> None:
        """Record the numbers of a flat JSON metrics file (a stage's final metrics)."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Attach tags to the run."""

    @contextmanager
    def child(self, name: str, tags: dict[str, Any]) -> Iterator[Tracker]:
        """A run nested under this one; a no-op tracker here."""
        yield Tracker()


# Stages that evaluate the meta-model: their runs are nested under the run that trained it.
READS_META_MODEL = ("metatest", "compare")


def stage_artifacts(project: Project, stage: str) -> dict[str, tuple[Path, ...]]:
    """Files a finished stage leaves that its run keeps, per artifact folder."""
    if stage != "metatrain":
        return {}
    meta = project.meta
    return {"checkpoints": (meta.best.with_suffix(".safetensors"), meta.best.with_suffix(".json"),
                            meta.last.with_suffix(".safetensors"))}


def stage_metrics(project: Project, stage: str) -> Path | None:
    """The final metrics file of a stage, logged as the run's metrics."""
    return project.results("metatrain") / "metrics.json" if stage == "metatrain" else None


def meta_model_file(project: Project) -> Path:
    return project.meta.best.with_suffix(".safetensors")


TAG_STAGE = "purer.stage"
TAG_MODEL = "purer.model_sha256"
TAG_PARENT = "purer.parent_run"
TAG_EXP = "dvc.exp_name"
TAG_BASELINE = "dvc.baseline_rev"
TAG_COMMIT = "mlflow.source.git.commit"  # the UI shows it as the run's source version
MLFLOW_PARENT = "mlflow.parentRunId"  # nests the run under its parent in the UI


class MlflowTracker(Tracker):
    """Logs to one MLflow run through an ``MlflowClient`` (no global MLflow state)."""

    def __init__(self, client: Any, run_id: str, root: Path) -> None:
        self.client = client
        self.run_id = run_id
        self.root = root

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_image(self, path: Path, key: str, step: int) -> None:
        from PIL import Image

        with Image.open(path) as image:
            image.load()
            # One series per key: the UI's image view steps through it.
            self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_metrics_file(self, path: Path) -> None:
        values = json.loads(Path(path).read_text())
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if numbers:
            self.log_metrics(numbers)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_stage_outputs(self, stage: str) -> None:
        """Attach what ``stage`` left in the project (checkpoints, final metrics)."""
        project = Project(self.root)
        for folder, files in stage_artifacts(project, stage).items():
            for path in files:
                if path.is_file():
                    self.log_artifact(path, folder)
        if stage == "metatrain" and meta_model_file(project).is_file():
            self.set_tags({TAG_MODEL: _sha256(meta_model_file(project))})
        metrics = stage_metrics(project, stage)
        if metrics and metrics.is_file():
            self.log_metrics_file(metrics)

    @contextmanager
    def child(self, name: str, tags: dict[str, Any]) -> Iterator[Tracker]:
        """A run nested under this one (one per method of the comparison table)."""
        parent = self.client.get_run(self.run_id)
        inherited = {k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")}
        run = self.client.create_run(parent.info.experiment_id, run_name=name, tags={
            **inherited, **{k: str(v) for k, v in tags.items()}, MLFLOW_PARENT: self.run_id, TAG_PARENT: self.run_id})
        child = MlflowTracker(self.client, run.info.run_id, self.root)
        with _ending(child):
            yield child

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def store_root(root: Path) -> Path:
    """The folder holding the store: the real repository root under DVC, else ``root``."""
    return Path(os.environ.get("DVC_ROOT") or root).resolve()


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite file at the store root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and re.fullmatch(r"[\w.-]+:\d+(/.*)?", uri):  # host:port, which MLflow takes for a folder
        raise TrackingError(f"MLFLOW_TRACKING_URI is {uri!r}, which has no scheme: add http:// "
                            f"(MLFLOW_TRACKING_URI=http://{uri}) for a tracking server.")
    return uri or f"sqlite:///{store_root(root) / 'mlflow.db'}"


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _get(url: str) -> None:
    """GET ``url`` (10 s timeout); a client error (4xx: not found, needs a login) is MLflow's to handle."""
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=10) as response:
            response.read()
    except HTTPError as err:
        if err.code >= 500:
            raise


def _check_server(uri: str, experiment: str) -> None:
    """Fail fast on an HTTP store that does not answer, or whose API fails (MLflow itself retries
    for minutes): its health check and an experiment lookup, each tried twice."""
    from urllib.error import URLError
    from urllib.parse import urlencode

    base = uri.rstrip("/")
    for url in (f"{base}/health", f"{base}/api/2.0/mlflow/experiments/get-by-name?"
                                  + urlencode({"experiment_name": experiment})):
        for attempt in (1, 2):
            try:
                _get(url)
                break
            except (URLError, OSError) as err:
                if attempt == 2:
                    raise TrackingError(
                        f"the MLflow server at {uri} does not work ({url} answers: {err}). Start or fix it (see "
                        "docs/tracking.md), unset MLFLOW_TRACKING_URI to use mlflow.db at the repository root, "
                        "or set tracking: false."
                    ) from err


def _check_artifact_location(name: str, location: str, expected: str, own_store: bool) -> None:
    """Refuse a local experiment whose artifacts live elsewhere than this project's ``mlruns``
    (``own_store``: the store is the project's mlflow.db) or in a folder that is gone: the
    project was moved or copied, and its artifacts would go to (or recreate) the old path."""
    if not location.startswith("file:"):
        return
    stale, here = (Path(url2pathname(urlparse(uri).path)) for uri in (location, expected))
    if stale == here or (not own_store and stale.parent.is_dir()):
        return  # a store shared through MLFLOW_TRACKING_URI keeps artifacts where it was created
    raise TrackingError(
        f"MLflow experiment '{name}' keeps its artifacts in {stale}, not in this project's {here}: the "
        "project was moved or copied with its store. Move it back, or set experiment_name to a new name "
        "(a new experiment, whose artifacts stay here)."
    )


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created with ``artifact_location`` if it is new; an
    existing one must keep its artifacts there (:func:`_check_artifact_location`)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            # Another queue worker created it in between.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment '{name}' is deleted. Restore it with `mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`, or set another experiment_name."
        )
    if artifact_location is not None:
        _check_artifact_location(name, experiment.artifact_location, artifact_location,
                                 "MLFLOW_TRACKING_URI" not in os.environ)
    return experiment.experiment_id


def _parent_run(client: Any, experiment_id: str, root: Path, commit: str | None) -> str | None:
    """The meta-training run behind the meta-model in ``root``: same DVC experiment, else the
    run that wrote this exact model file, else the latest one at the same commit."""
    filters = []
    if os.environ.get("DVC_EXP_NAME"):
        filters.append(f"tags.`{TAG_EXP}` = '{os.environ['DVC_EXP_NAME']}'")
    model = meta_model_file(Project(root))
    if model.is_file():
        filters.append(f"tags.`{TAG_MODEL}` = '{_sha256(model)}'")
    if commit:
        filters.append(f"tags.`{TAG_COMMIT}` = '{commit}'")
    for condition in filters:
        runs = client.search_runs([experiment_id], max_results=1, order_by=["start_time DESC"],
                                  filter_string=f"tags.`{TAG_STAGE}` = 'metatrain' and {condition}")
        if runs:
            return runs[0].info.run_id
    return None


def _start_run(params: Any, stage: str, root: Path) -> MlflowTracker:
    """Open the store, the experiment and a new run, logging params and inputs: any failure is
    a :class:`TrackingError` raised before the stage does any work."""
    uri = tracking_uri(root)
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    # MLflow logs a store error with its whole traceback before raising it; the one line below says it all.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    remote = uri.startswith(("http://", "https://", "databricks"))
    if uri.startswith(("http://", "https://")):
        _check_server(uri, params.experiment_name)
    # A local store keeps artifacts at the store root, even when the run works in a temp copy.
    artifacts = None if remote else Path(store_root(root), "mlruns").resolve().as_uri()
    commit = git_commit(root)
    tags = {
        TAG_STAGE: stage,
        "stage": os.environ.get("DVC_STAGE") or stage,
        "dataset": params.dataset,
        "scenario": scenario(params),
        "meta_learner": params.meta_learner,
        TAG_EXP: os.environ.get("DVC_EXP_NAME"),
        TAG_BASELINE: os.environ.get("DVC_EXP_BASELINE_REV"),
        TAG_COMMIT: commit,
    }
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, params.experiment_name, artifacts)
        if stage in READS_META_MODEL:
            parent = _parent_run(client, experiment_id, root, commit)
            tags.update({TAG_PARENT: parent, MLFLOW_PARENT: parent})
        run = client.create_run(experiment_id, run_name=run_name(params, stage),
                                tags={k: str(v) for k, v in tags.items() if v})
        tracker = MlflowTracker(client, run.info.run_id, root)
        flat = [Param(k, str(v)) for k, v in params.flat().items()]
        for i in range(0, len(flat), 100):  # log_batch takes at most 100 params
            client.log_batch(tracker.run_id, params=flat[i:i + 100])
        # Writing the inputs now also proves the artifact store is writable.
        for path in (Project(root).params_file, Project(root).dvc_lock):
            if path.is_file():
                tracker.log_artifact(path)
    except (MlflowException, SQLAlchemyError, OSError) as err:
        raise TrackingError(
            f"cannot log to the MLflow store {uri}: {_root_cause(err)}. Fix the store or its folder, unset "
            "MLFLOW_TRACKING_URI to use mlflow.db at the repository root, or set tracking: false."
        ) from err
    return tracker


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost cause (sqlite's "attempt to write a readonly database"
    rather than SQLAlchemy's many lines of SQL)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


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
    with _ending(tracker):
        yield tracker
        tracker.log_stage_outputs(stage)


@contextmanager
def _ending(tracker: MlflowTracker) -> Iterator[None]:
    """End the tracker's run when the block does: FINISHED, KILLED on Ctrl-C, else FAILED."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
