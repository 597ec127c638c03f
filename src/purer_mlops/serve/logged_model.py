"""The served models as MLflow 3 logged models of the meta-training run (stage ``metatrain``
hands :func:`~.registry.log_served_models` to its tracker): ``meta_model``, the selected
meta-model (:func:`log_meta_model`), and ``teachers_ensemble``, the pool's teachers as one
nearest-prototype classifier (:func:`log_teachers_ensemble`).

Each is a ``pyfunc`` model (:mod:`purer_mlops.serve.pyfunc`) holding its weights (and card or
``pool.json``), the package's code (so it loads and serves where purer-mlops is not installed,
given its pip requirements), the input schema and an input example. It is logged at the step of
the selected iteration, and the meta-val accuracy that ranks it is logged again linked to it, so
the run page lists it under "Logged models" and the model page shows its metrics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MODEL_NAME = "meta_model"
ENSEMBLE_NAME = "teachers_ensemble"
MODEL_TYPE = "few-shot-classifier"
PROGRESS_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "safetensors", "pillow", "numpy", "pandas",
                                                    "tqdm", "pyyaml", "filelock")]


@contextmanager
def fluent_store(client: Any) -> Iterator[None]:
    """MLflow's global tracking URI pointed at ``client``'s store for the block: the fluent API
    logs there, and the registry finds a logged model through it (``MlflowClient()``), not through
    the default ``./mlflow.db`` of the working directory (a queued DVC experiment's temporary copy)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_pyfunc(client: Any, run_id: str, name: str, artifacts: dict[str, Path], step: int,
               linked: dict[str, float], tags: dict[str, str]) -> str:
    """Log a pyfunc model ``name`` into the run: ``artifacts`` (artifact key → folder) loaded by
    :class:`~.pyfunc.FewShotPyfunc`; ``linked`` metrics logged again, linked to it. Returns its model id."""
    import mlflow
    from mlflow.entities import Metric

    import purer_mlops

    from . import mlflow_model
    from .pyfunc import example_frame, signature

    quiet = os.environ.get(PROGRESS_BARS)
    os.environ[PROGRESS_BARS] = "false"  # MLflow's download bars, while it checks the input example
    try:
        # The fluent API is the one that logs a model into an existing run.
        with fluent_store(client), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name, python_model=mlflow_model.__file__, artifacts={k: str(v) for k, v in artifacts.items()},
                code_paths=[str(Path(purer_mlops.__file__).parent)], signature=signature(),
                input_example=example_frame(), pip_requirements=_requirements(), step=step,
                model_type=MODEL_TYPE, tags=tags)
    finally:
        if quiet is None:
            os.environ.pop(PROGRESS_BARS, None)
        else:
            os.environ[PROGRESS_BARS] = quiet
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step, model_id=info.model_id) for k, v in linked.items()])
    return info.model_id


def log_meta_model(client: Any, run_id: str, stem: Path, metrics: dict) -> str:
    """Log ``<stem>.safetensors`` + ``<stem>.json`` as the run's pyfunc model ``meta_model``;
    returns its model id. ``metrics`` is the stage's ``metrics.json`` (``best_iteration``,
    ``best_val_accuracy``)."""
    from .pyfunc import ARTIFACT, STEM

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ARTIFACT
        folder.mkdir()
        for suffix in (".safetensors", ".json"):
            shutil.copy2(stem.with_suffix(suffix), folder / f"{STEM}{suffix}")
        linked = {k: float(metrics[k]) for k in ("best_val_accuracy", "final_val_accuracy") if k in metrics}
        return log_pyfunc(client, run_id, MODEL_NAME, {ARTIFACT: folder}, int(metrics.get("best_iteration", 0)),
                          linked, {"purer.selected_on": "meta-val accuracy"})


def log_teachers_ensemble(client: Any, run_id: str, pool: Path, val_accuracy: float, step: int) -> str:
    """Log the pool in ``pool`` (``pool.json`` and the weights it names) as the run's pyfunc model
    ``teachers_ensemble``, with its meta-val accuracy (percent) linked as ``val_accuracy``; returns its model id."""
    from ..models.pool_storage import POOL_FILE, read_records
    from .pyfunc import TEACHERS

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / TEACHERS
        folder.mkdir()
        for name in (POOL_FILE, *(r.file for r in read_records(pool))):
            shutil.copy2(pool / name, folder / name)
        return log_pyfunc(client, run_id, ENSEMBLE_NAME, {TEACHERS: folder}, step,
                          {"val_accuracy": float(val_accuracy)}, {"purer.rule": "mean of nearest-prototype heads"})
