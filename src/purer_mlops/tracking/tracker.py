"""The tracker stages log through: :class:`Tracker` (no-op, ``tracking: false``) and
:class:`MlflowTracker` (one MLflow run, through an ``MlflowClient``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..paths import Project
from .outputs import link_test_metrics, meta_model_file, sha256, stage_artifacts, stage_metrics


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

    def log_model(self, stem: Path, log: Callable[[Any, str], object]) -> None:
        """Log the meta-model ``<stem>.safetensors`` (+ card) as the run's MLflow model: ``log(client,
        run_id)`` writes it (the serving code knows what the model is; tracking only where it goes)."""

    @contextmanager
    def child(self, name: str, tags: dict[str, Any]) -> Iterator[Tracker]:
        """A run nested under this one; a no-op tracker here."""
        yield Tracker()


TAG_STAGE = "purer.stage"
TAG_MODEL = "purer.model_sha256"
TAG_PARENT = "purer.parent_run"
TAG_EXP = "dvc.exp_name"
TAG_BASELINE = "dvc.baseline_rev"
TAG_COMMIT = "mlflow.source.git.commit"  # the UI shows it as the run's source version
MLFLOW_PARENT = "mlflow.parentRunId"  # nests the run under its parent in the UI


class MlflowTracker(Tracker):
    """Logs to one MLflow run through an ``MlflowClient`` (no global MLflow state).

    Metrics are buffered and written in one ``log_batch`` every ``FLUSH_SECONDS`` (and before
    anything else is logged, and when the run ends): one SQLite write per meta-iteration cost
    4.5 ms, 2% of a default meta-iteration on a 2-core CPU, 9x the buffered cost
    (``tests/benchmarks/test_tracking_metrics.py``).
    """

    FLUSH_SECONDS = 10.0
    FLUSH_METRICS = 900  # MLflow accepts at most 1000 metrics per batch

    def __init__(self, client: Any, run_id: str, root: Path) -> None:
        self.client = client
        self.run_id = run_id
        self.root = root
        self.monitor: Any = None
        self.pending: list = []  # mlflow.entities.Metric not yet written
        self.flushed_at = time.monotonic()

    def monitor_system(self) -> None:
        """Log CPU, memory (and GPU, with pynvml) as system metrics until the run ends."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.client.tracking_uri)
        self.monitor.start()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if (len(self.pending) >= self.FLUSH_METRICS
                or time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        """Write the buffered metrics (the UI shows a running run's curves up to here)."""
        if self.pending:
            with storing(f"metrics to MLflow run {self.run_id}"):
                self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []
        self.flushed_at = time.monotonic()

    def log_image(self, path: Path, key: str, step: int) -> None:
        from PIL import Image

        self.flush()

        with Image.open(path) as image, storing(f"image {path} to MLflow run {self.run_id}"):
            image.load()
            # One series per key: the UI's image view steps through it.
            self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.flush()
        with storing(f"{path} to MLflow run {self.run_id}"):
            self.client.log_artifact(self.run_id, str(path), folder)

    def log_metrics_file(self, path: Path) -> None:
        values = json.loads(Path(path).read_text())
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if numbers:
            self.log_metrics(numbers)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_model(self, stem: Path, log: Callable[[Any, str], object]) -> None:
        from mlflow.exceptions import MlflowException

        from .store import TrackingError, root_cause

        self.flush()
        try:
            log(self.client, self.run_id)
        except (MlflowException, OSError) as err:
            raise TrackingError(f"cannot log the meta-model {stem} to MLflow run {self.run_id}: {root_cause(err)}. "
                                f"The model itself is saved in {stem.parent}; fix the store, or set tracking: "
                                "false.") from err

    def log_stage_outputs(self, stage: str) -> None:
        """Attach what ``stage`` left in the project (checkpoints, final metrics)."""
        project = Project(self.root)
        for folder, files in stage_artifacts(project, stage).items():
            for path in files:
                if path.is_file():
                    self.log_artifact(path, folder)
        if stage == "metatrain" and meta_model_file(project).is_file():
            self.set_tags({TAG_MODEL: sha256(meta_model_file(project))})
        metrics = stage_metrics(project, stage)
        if metrics and metrics.is_file():
            self.log_metrics_file(metrics)
        if stage == "metatest":
            link_test_metrics(self.client, self.run_id, project.results("metatest") / "details.json")

    @contextmanager
    def child(self, name: str, tags: dict[str, Any]) -> Iterator[Tracker]:
        """A run nested under this one (one per method of the comparison table)."""
        parent = self.client.get_run(self.run_id)
        inherited = {k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")}
        run = self.client.create_run(parent.info.experiment_id, run_name=name, tags={
            **inherited, **{k: str(v) for k, v in tags.items()}, MLFLOW_PARENT: self.run_id, TAG_PARENT: self.run_id})
        child = MlflowTracker(self.client, run.info.run_id, self.root)
        with ending(child):
            yield child

    def end(self, status: str) -> None:
        self.flush()
        if self.monitor is not None:
            self.monitor.finish()
        self.client.set_terminated(self.run_id, status)


@contextmanager
def storing(what: str) -> Iterator[None]:
    """A failed write to the store (a full disk under ``mlruns/`` or ``mlflow.db``, a read-only
    store) as one line naming it. The stage stops there; what it wrote is whole (atomic writes),
    and a meta-training run resumes from its last state."""
    from mlflow.exceptions import MlflowException

    from .store import TrackingError, root_cause

    try:
        yield
    except (MlflowException, OSError) as err:
        raise TrackingError(f"cannot store {what}: {root_cause(err)}. Free some disk space or fix the store's "
                            "permissions (or set tracking: false), then re-run the stage.") from err


@contextmanager
def ending(tracker: MlflowTracker) -> Iterator[None]:
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
