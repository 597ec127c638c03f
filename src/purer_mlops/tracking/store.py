"""Where the MLflow store is, and opening it: a store that does not work fails fast, in one line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from ..errors import UserError

# MLflow 3's experiment kind: model training (runs, metrics, models), not GenAI.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# MLflow 3.17's UI no longer picks its view from that tag but from this query parameter (else from
# the browser's last choice, GenAI at first): an address holding it opens the model-training view.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def ui_address(base: str, experiment_id: str | None) -> str:
    """Where the UI at ``base`` shows the experiment (or the list of experiments) as model training."""
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{base.rstrip('/')}/#/{page}?{MODEL_TRAINING_VIEW}"


class TrackingError(UserError):
    """The tracking store cannot be reached or written: the stage stops before it starts."""


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


def check_server(uri: str, experiment: str) -> None:
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


def open_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created with ``artifact_location`` if it is new; an
    existing one must keep its artifacts there (:func:`_check_artifact_location`)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
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
    for key, value in EXPERIMENT_TAGS.items():  # experiments created before the tag existed
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def root_cause(err: BaseException) -> str:
    """The first line of the innermost cause (sqlite's "attempt to write a readonly database"
    rather than SQLAlchemy's many lines of SQL)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
