"""A summary as an MLflow run of the project's experiment, so the UI shows it beside the runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..tracking.runs import git_commit
from ..tracking.store import TrackingError, open_experiment, root_cause, store_root, tracking_uri
from ..tracking.tracker import TAG_COMMIT, TAG_STAGE

STAGE = "summarize"


def _metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``test_mean/<i>``, ``val_mean/<i>``, ... per setting ``i`` (its label is the run's param
    ``setting/<i>``): MLflow metric names cannot hold a setting's ``=``."""
    out: dict[str, float] = {}
    for i, row in enumerate(rows):
        for key in ("val_mean", "val_ci", "test_mean", "test_ci", "d_val", "d_test", "d_test_ci", "d_test_p"):
            value = row.get(key)
            if isinstance(value, (int, float)) and not math.isnan(value):
                out[f"{key}/{i}"] = float(value)
    return out


def log_summary(root: Path, experiment: str, rows: list[dict[str, Any]], files: dict[str, Path],
                reference: str | None) -> str:
    """Log the summary's table (as an MLflow table and the files) to a new run; its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    uri = tracking_uri(root)
    artifacts = None if uri.startswith(("http://", "https://", "databricks")) else \
        Path(store_root(root), "mlruns").resolve().as_uri()
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment_id = open_experiment(client, experiment, artifacts)
        tags = {TAG_STAGE: STAGE, "stage": STAGE, TAG_COMMIT: git_commit(root)}
        run = client.create_run(experiment_id, run_name=f"summary over seeds ({len(rows)} settings)",
                                tags={k: str(v) for k, v in tags.items() if v})
        run_id = run.info.run_id
        params = [Param("reference", reference or "none")] + [Param(f"setting/{i}", r["setting"][:500])
                                                              for i, r in enumerate(rows)]
        client.log_batch(run_id, params=params[:100], tags=[RunTag("mlflow.note.content", _note(rows))],
                         metrics=[Metric(k, v, 0, 0) for k, v in _metrics(rows).items()])
        client.log_table(run_id, {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)},
                         "summary_table.json")
        for path in files.values():
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
    except (MlflowException, SQLAlchemyError, OSError) as err:
        raise TrackingError(f"cannot log the summary to the MLflow store {uri}: {root_cause(err)}. Fix the store, "
                            "or leave it out with --no-mlflow.") from err
    return run_id


def _note(rows: list[dict[str, Any]]) -> str:
    """The run's description in the UI: the Markdown table's lines."""
    from .report import markdown

    return "Meta-val and meta-test accuracy per setting over seeds (95% t-intervals).\n\n" + markdown(rows)
