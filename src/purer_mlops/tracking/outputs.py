"""What each stage leaves in the project that its MLflow run keeps (files, final metrics)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..paths import Project

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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
