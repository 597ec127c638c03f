"""What each stage leaves in the project that its MLflow run keeps (files, final metrics)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..paths import Project

# Stages that evaluate the meta-model: their runs are nested under the run that trained it.
READS_META_MODEL = ("metatest", "compare")

# The logged meta-model's name: serve.logged_model.MODEL_NAME (tracking imports no domain room).
META_MODEL = "meta_model"


def stage_artifacts(project: Project, stage: str) -> dict[str, tuple[Path, ...]]:
    """Files a finished stage leaves that its run keeps, per artifact folder."""
    if stage != "metatrain":
        return {}
    meta = project.meta
    return {"checkpoints": (meta.best.with_suffix(".safetensors"), meta.best.with_suffix(".json"),
                            meta.last.with_suffix(".safetensors"))}


def stage_metrics(project: Project, stage: str) -> Path | None:
    """The file of a stage whose numbers are logged as the run's final metrics: the whole record
    (``details.json``, whose keys stay those of the MLflow runs), not the headline of ``dvc exp show``."""
    return project.results("metatrain") / "details.json" if stage == "metatrain" else None


def meta_model_file(project: Project) -> Path:
    return project.meta.best.with_suffix(".safetensors")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def link_test_metrics(client: Any, run_id: str, metrics_file: Path) -> None:
    """Log a metatest run's accuracy again, linked to the logged meta-model it evaluated (its parent
    run's ``meta_model``; the run's other model is the teachers' ensemble), so the model's page
    shows its meta-test accuracy beside its meta-val one."""
    from mlflow.entities import Metric

    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    if not parent or not metrics_file.is_file():
        return
    outputs = client.get_run(parent).outputs
    models = [m for m in (outputs.model_outputs if outputs else []) if client.get_logged_model(m.model_id).name
              == META_MODEL]
    if not models:
        return
    values = json.loads(metrics_file.read_text())
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"test_{k}", float(values[k]), now, 0, model_id=models[-1].model_id)
                                      for k in ("accuracy", "ci95") if k in values])
