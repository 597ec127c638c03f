"""The served models in the MLflow Model Registry, so that ``mlflow models serve -m
models:/purer-<dataset>@champion`` serves the best of them.

Every tracked meta-training run (stage ``metatrain``, :func:`log_served_models`) logs two models
(:mod:`.logged_model`) and registers each as a new version of the registered model
:func:`registered_name` (``purer-glyphs`` on the default project), tagged with its kind
(:data:`TAG_KIND`: ``meta-model`` or ``teachers-ensemble``) and its meta-val accuracy
(:data:`TAG_VAL`, percent, on the meta-val tasks meta-training validates on: the meta-model's own
head, the ensemble's nearest-prototype heads). Then it moves two aliases:

- ``@champion``: the version with the highest meta-val accuracy of all versions of the name (the
  latest on a tie): the model to serve;
- ``@baseline``: the meta-model of this run: PURER's data-free meta-model, the one to compare with.

Scoring the ensemble on meta-val (:func:`ensemble_val_accuracy`) is done once per pool, meta-val
split and task knobs: a later run with the same :func:`val_key` (a sweep over meta-training
knobs) reads the accuracy from the version registered before. An oracle run (meta-trained on
real images, not data-free) logs its meta-model and registers nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..config import Params
from ..meta.heads import FORM, SCALE
from ..paths import Project
from .ensemble import KIND as ENSEMBLE
from .logged_model import fluent_store, log_meta_model, log_teachers_ensemble

CHAMPION, BASELINE = "champion", "baseline"
META_MODEL = "meta-model"
TAG_KIND = "purer.model"
TAG_VAL = "purer.val_accuracy"
TAG_KEY = "purer.val_key"  # hash of what an ensemble's meta-val accuracy depends on (:func:`val_key`)


def registered_name(dataset: str) -> str:
    """The registered model of a dataset's served models: ``purer-<dataset>``."""
    return f"purer-{dataset}"


def ensemble_val_accuracy(params: Params, project: Project) -> float | None:
    """Mean accuracy (percent) of the teachers' ensemble on meta-training's meta-val tasks, as the
    comparison table's ``teachers-ensemble`` row computes it; None when the pool's image space is
    not the dataset's (the ensemble cannot be served on it)."""
    from ..data.dataset import load_split
    from ..meta.baselines import meta_val_tasks, space_blocker, teacher_accuracies
    from ..models.pool_storage import load_pool

    val = load_split(params.dataset, project.dataset(params.dataset), "meta_val")
    pool = load_pool(project.teachers)
    if space_blocker([r for r, _ in pool], val):
        return None
    _, ensemble = teacher_accuracies(pool, val, meta_val_tasks(params, val, params.num_sup_test))
    return 100.0 * float(ensemble.mean())


def val_key(client: Any, run_id: str, params: Params) -> str | None:
    """What the ensemble's meta-val accuracy depends on, hashed: the digests of the run's teachers
    and meta-val inputs (DVC's hashes) and the knobs that draw meta-training's meta-val tasks; None
    when the run lacks either input."""
    inputs = {d.dataset.name: d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs}
    digests = [inputs.get("teachers"), inputs.get(f"{params.dataset}/meta_val")]
    if None in digests:
        return None
    spec = [*digests, params.metatrain.val_episodes, params.way_test, params.num_sup_test, params.num_qur_test,
            params.seed, FORM, SCALE]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def known_val_accuracy(client: Any, name: str, key: str | None) -> float | None:
    """The meta-val accuracy a registered ensemble version of ``name`` already carries for ``key``."""
    if key is None:
        return None
    versions = client.search_model_versions(f"name = '{name}'")
    return next((float(v.tags[TAG_VAL]) for v in versions if v.tags.get(TAG_KEY) == key and TAG_VAL in v.tags), None)


def register(client: Any, name: str, model_id: str, run_id: str, kind: str, val_accuracy: float,
             key: str | None = None) -> str:
    """Register the logged model ``model_id`` as a new version of ``name`` (created when new), tagged
    with its kind, meta-val accuracy and (an ensemble) :func:`val_key`; its version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="purer-mlops few-shot classifiers (docs/tracking.md)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with fluent_store(client):
        version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                              tags={TAG_KIND: kind, TAG_VAL: f"{val_accuracy:.4f}",
                                                    **({TAG_KEY: key} if key else {})})
    return str(version.version)


def set_aliases(client: Any, name: str, baseline: str) -> str:
    """Point ``@baseline`` at version ``baseline`` and ``@champion`` at the best on meta-val; the champion."""
    versions = client.search_model_versions(f"name = '{name}'")
    scored = [(float(v.tags[TAG_VAL]), int(v.version)) for v in versions if TAG_VAL in v.tags]
    champion = str(max(scored)[1])
    client.set_registered_model_alias(name, CHAMPION, champion)
    client.set_registered_model_alias(name, BASELINE, baseline)
    return champion


def log_served_models(client: Any, run_id: str, params: Params, project: Project, metrics: dict) -> str:
    """Log the selected meta-model and the teachers' ensemble into the run, register both and move
    the aliases (module docstring); returns the champion's version ("" for an oracle run)."""
    model_id = log_meta_model(client, run_id, project.meta.best, metrics)
    if metrics.get("oracle"):
        return ""
    name = registered_name(params.dataset)
    baseline = register(client, name, model_id, run_id, META_MODEL, float(metrics["best_val_accuracy"]))
    key = val_key(client, run_id, params)
    val = known_val_accuracy(client, name, key)
    val = ensemble_val_accuracy(params, project) if val is None else val
    if val is not None:
        ensemble_id = log_teachers_ensemble(client, run_id, project.teachers, val,
                                            int(metrics.get("best_iteration", 0)))
        register(client, name, ensemble_id, run_id, ENSEMBLE, val, key)
    return set_aliases(client, name, baseline)
