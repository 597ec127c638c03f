"""The project's layout on disk, spelled once: every stage, tracking and the table use it.

::

    <root>/params.yaml, dvc.lock, .purer.lock
    <root>/data/raw/                      what the user brings (dvc add)
    <root>/data/<dataset>/meta_{train,val,test}/<class>/<image>, split/*.csv
    <root>/models/teachers/               the teacher pool (pool.json + safetensors)
    <root>/models/meta/                   the meta-model (see :class:`ModelDir`)
    <root>/models/compare/<run>/          meta-models the comparison table trains
    <root>/results/<stage>/               metrics, curves and images of each stage
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelDir:
    """A meta-training run's model folder: ``best``/``last`` (``.safetensors`` + ``.json`` card),
    ``last.pt`` (the resumable state), ``history/iter_<n>`` (every validated model), and
    ``in_progress.json`` while a run that has not finished owns the folder."""

    folder: Path

    @property
    def best(self) -> Path:
        return self.folder / "best"

    @property
    def last(self) -> Path:
        return self.folder / "last"

    @property
    def resume_state(self) -> Path:
        return self.folder / "last.pt"

    @property
    def history(self) -> Path:
        return self.folder / "history"

    @property
    def in_progress(self) -> Path:
        return self.folder / "in_progress.json"

    def validated(self, iteration: int) -> Path:
        """Stem of the model validated at ``iteration``."""
        return self.history / f"iter_{iteration:06d}"


@dataclass(frozen=True)
class Project:
    """Paths of one project root (a clone, or a temporary copy DVC runs an experiment in)."""

    root: Path

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    @property
    def stage_lock(self) -> Path:
        return self.root / ".purer.lock"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    def dataset(self, name: str) -> Path:
        """``data/<name>``: the seed's folder layout and its filelists."""
        return self.root / "data" / name

    @property
    def teachers(self) -> Path:
        return self.root / "models" / "teachers"

    @property
    def meta(self) -> ModelDir:
        return ModelDir(self.root / "models" / "meta")

    def compare_models(self, run: str) -> ModelDir:
        return ModelDir(self.root / "models" / "compare" / run)

    def results(self, stage: str) -> Path:
        return self.root / "results" / stage
