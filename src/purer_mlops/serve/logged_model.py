"""The selected meta-model as an MLflow 3 logged model of the meta-training run (stage
``metatrain`` hands :func:`log_meta_model` to its tracker).

A ``pyfunc`` model (:mod:`purer_mlops.serve.pyfunc`) holding ``best.safetensors`` and its card,
the package's code (so it loads and serves where purer-mlops is not installed, given its pip
requirements), the input schema and an input example. It is logged at the step of the selected
iteration, and the metrics that selected it are logged again linked to it, so the run page
lists it under "Logged models" and the model page shows its metrics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL_NAME = "meta_model"
MODEL_TYPE = "few-shot-classifier"
PROGRESS_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "safetensors", "pillow", "numpy", "pandas",
                                                    "tqdm", "pyyaml", "filelock")]


def log_meta_model(client: Any, run_id: str, stem: Path, metrics: dict) -> str:
    """Log ``<stem>.safetensors`` + ``<stem>.json`` as the run's pyfunc model; returns its model id.

    ``metrics`` is the stage's ``metrics.json`` (``best_iteration``, ``best_val_accuracy``).
    """
    import mlflow
    from mlflow.entities import Metric

    import purer_mlops

    from . import mlflow_model
    from .pyfunc import ARTIFACT, STEM, example_frame, signature

    step = int(metrics.get("best_iteration", 0))
    previous = mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ARTIFACT
        folder.mkdir()
        for suffix in (".safetensors", ".json"):
            shutil.copy2(stem.with_suffix(suffix), folder / f"{STEM}{suffix}")
        # The fluent API is the one that logs a model into an existing run: point it at this
        # run's store for the call only.
        mlflow.set_tracking_uri(client.tracking_uri)
        quiet = os.environ.get(PROGRESS_BARS)
        os.environ[PROGRESS_BARS] = "false"  # MLflow's download bars, while it checks the input example
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME, python_model=mlflow_model.__file__, artifacts={ARTIFACT: str(folder)},
                    code_paths=[str(Path(purer_mlops.__file__).parent)], signature=signature(),
                    input_example=example_frame(), pip_requirements=_requirements(), step=step,
                    model_type=MODEL_TYPE, tags={"purer.selected_on": "meta-val accuracy"})
        finally:
            mlflow.set_tracking_uri(previous)
            if quiet is None:
                os.environ.pop(PROGRESS_BARS, None)
            else:
                os.environ[PROGRESS_BARS] = quiet
    now = int(time.time() * 1000)
    linked = {k: float(metrics[k]) for k in ("best_val_accuracy", "final_val_accuracy") if k in metrics}
    client.log_batch(run_id, metrics=[Metric(k, v, now, step, model_id=info.model_id) for k, v in linked.items()])
    return info.model_id
